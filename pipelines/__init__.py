"""Data pipelines: raw sources -> splits and vocabularies -> TFDS ArrayRecord -> grain loaders."""
