from .bbu_data import BBUDataset
from .extended import ExtendedVisionDataset, ImageDecodeError
from .image_folder import ImageFolder
from .image_net import ImageNet
from .image_net_22k import ImageNet22k
from .image_paths import EncodedImages, ImagePaths

__all__ = ["BBUDataset", "EncodedImages", "ExtendedVisionDataset", "ImageDecodeError", "ImageFolder", "ImageNet",
           "ImageNet22k", "ImagePaths"]
