from .adapters import DatasetWithEnumeratedTargets
from .augmentations import DataAugmentationDINO
from .collate import collate_data_and_cast
from .loaders import DATASET_REGISTRY, SamplerType, make_data_loader, make_dataset, register_dataset
from .masking import MaskingGenerator
from .transforms import make_classification_eval_transform, make_classification_train_transform
