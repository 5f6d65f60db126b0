"""ml_collections config files: `python -m launch.train --config=configs/<name>.py`."""
