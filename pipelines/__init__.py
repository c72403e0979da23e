"""Pipeline wiring: config → Ray DAG of stages, stage cache, MLflow run tree."""
