"""Everything that touches a model; knows nothing of Ray or MLflow."""
