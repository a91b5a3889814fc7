"""A model over a cohort of slides and plates on Dask distributed, the local cluster it runs on,
and the cohort plots."""
