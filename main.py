r"""trigflow-distill: distill a many-step Cosmos video diffusion teacher into a 4-step student (DMD2, TrigFlow).

  python main.py --config=configs/predict25_4step.py:tiny --workdir=/tmp/run      # CPU demo, ~10 min
  python main.py --config=configs/predict25_4step.py --workdir=DIR \
      --config.teacher.path=TEACHER.pt --config.data.path=LATENTS_DIR             # real 2B recipe

Re-running with the same --workdir resumes from its latest checkpoint. Override any config field with
--config.<field>=<value> (e.g. --config.total_steps=100); unknown fields are rejected.
Multi-host: TPU VMs are detected automatically; elsewhere pass --coordinator_address, --num_processes and
--process_id (or run under SLURM) — see launch/.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/predict25_4step.py[:tiny].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval; resumed if it exists.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (not needed on TPU VMs).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; our progress lines go to stdout
        logging.set_verbosity(logging.WARNING)
    # Imported after flag parsing: keeps --help fast and leaves JAX uninitialised until the distributed set-up.
    from trigflow_distill import distributed
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    except ValueError as e:
        _fail(e)
    # Only now: importing the networks may already touch the JAX backend.
    from trigflow_distill import data_kinds, run, train
    try:
        kind = data_kinds.get(config)
        run.validate_config(config)
        source, write_samples = kind.open(config)
        train.train(config, workdir, source, write_samples)
        if config.eval.at_end and kind.evaluate is None:
            print(f"config.eval.at_end: data.kind={config.data.kind!r} has no evaluation; skipped.")
        elif config.eval.at_end and distributed.is_single_process():
            kind.evaluate(workdir)
        elif config.eval.at_end and distributed.is_main_process():
            print("Multi-host run: evaluate on one host with "
                  f"`python -m trigflow_distill.toy.evaluate --workdir={workdir}`.")
    except (ValueError, FileNotFoundError, train.TrainingStopped) as e:
        _fail(e)


def _fail(e: Exception):
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    app.run(main)
