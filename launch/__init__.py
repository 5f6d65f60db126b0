"""Entry points: python -m launch.{run,prepare_data,train,evaluate}."""
