"""Training the patch model: augmentations, losses, training patches, the patch encoder, the
stages of a run (self-learning, supervised contrastive, linear head), domain pretraining and the
model bundle they produce."""
