"""From pixels to dense feature maps: backbones and weights, intensity normalisation, the
foreground mask, tiling, the fully convolutional extractor, its on-disk cache and the feature
normalisation the search compares with."""
