"""Per-channel pixel statistics (mean, std) of the datasets the defaults refer to: their one home."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
