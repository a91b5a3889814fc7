"""Running a model bundle: dense class maps, detections and segmentation, every output file of
``predict``, and the per-image quantification table."""
