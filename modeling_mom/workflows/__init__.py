"""Training, evaluation and demo tooling on top of the models (the `mom` command). Modeling files never import it."""
