"""The trainer: run builder, host loop, workdir config / lock / checkpoints / restore, metrics, memory plan."""
