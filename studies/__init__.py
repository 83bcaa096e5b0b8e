"""Studies: data generators and experiment runners that answer one question each (see studies/README.md)."""
