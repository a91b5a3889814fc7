"""The similarity search (SimSearch's Iterative Patch Selection): pooled window vectors,
prototype queries and suggestions, prototype checks, mining of unlabelled patches, and the
search head fitted on the search's own vectors."""
