r"""The training command (`python main.py` / `trigflow-train`): distill a many-step Cosmos video diffusion teacher
into a 4-step student (DMD2, TrigFlow).

  python main.py --config=configs/predict25_4step.py:tiny --workdir=/tmp/run      # CPU demo, ~17 min on 2 cores
  trigflow-train --config=configs/predict25_4step.py:tiny --workdir=/tmp/run      # the same
  python main.py --config=configs/predict25_4step.py --workdir=DIR \
      --config.teacher.path=TEACHER.pt --config.data.path=LATENTS_DIR             # real 2B recipe

Re-running with the same --workdir resumes from its latest checkpoint (the config must be the same, up to
total_steps, log/sample/checkpoint intervals, eval and mesh; --config.allow_config_change=True overrides); a
workdir without a checkpoint is fresh (a failed first start does not bind the rerun). Override any config field with
--config.<field>=<value> (e.g. --config.total_steps=100); unknown fields are rejected; --print_config lists every
field with its value and one-line doc. Multi-host: TPU VMs are detected automatically; elsewhere pass
--coordinator_address, --num_processes and --process_id (or run under SLURM) — see launch/.
"""

import ast
import io
import re
import sys
import tokenize

from absl import flags, logging
from ml_collections import config_flags

from trigflow_distill.common import cli
from trigflow_distill.common.errors import CLI_ERRORS, fail

config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/predict25_4step.py[:tiny].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval; resumed if it exists.")
flags.DEFINE_bool(
    "print_config", False, "Print every config field with its value and one-line doc, then exit (no --workdir needed)."
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (not needed on TPU VMs).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.mark_flags_as_required(["config"])  # --workdir: checked in main, --print_config needs none


def parse_flags(argv):
    """absl flag parsing with every mistake as one `error:` line: unknown or mistyped config fields, a missing
    or broken config file, missing required flags."""
    try:
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.to_dict()  # a config file that failed to load raises only when first used
        return rest
    except (KeyError, AttributeError) as e:  # ml_collections: an override of a field the config lacks
        key = str(e).strip("'\"")
        given = [
            a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].split(".")[-1] == key
        ] or [f"--config...{key}"]
        sys.exit(fail(ValueError(f"{given[0]}: the config has no field {key!r}; see the config file for its fields.")))
    except flags.Error as e:
        sys.exit(fail(ValueError(_one_line(e))))
    except Exception as e:  # noqa: BLE001 - a config file is user code: whatever it raises is a config error
        sys.exit(fail(ValueError(f"cannot load --config: {_one_line(e)}")))


def _one_line(e: BaseException) -> str:
    """ml_collections' errors span lines (attempted paths, the config file's traceback); keep the reason."""
    text = str(e).strip() or type(e).__name__
    if "Traceback (most recent call last)" in text:  # the head says where, the last line what
        head = text.split("Traceback (most recent call last)")[0].rstrip(": \n\t")
        text = f"{head}: {text.splitlines()[-1].strip()}"
    text = " ".join(text.split())
    return re.sub(r"^Configuration is not available because of an earlier failure to load: ", "", text)


def field_docs(path: str) -> dict[str, str]:
    """{dotted field: one-line doc} from the comments of a config file's `get_config`: a field's doc is the comment
    at the end of its line, else the comment lines right above it. A section (`c.x = ConfigDict(...)`) gets the
    comment above it; its fields of `ConfigDict(dict(k=v, ...))` the comment on or above their own line. Read with
    ast/tokenize, so comments are the one place a field is documented (no second table to drift)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    comments, whole_line = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = tok.string.lstrip("#").strip()
            if lines[row - 1].lstrip().startswith("#"):
                whole_line.add(row)

    def above(row: int) -> str:
        block, row = [], row - 1
        while row in whole_line:
            block.insert(0, comments[row])
            row -= 1
        return " ".join(block)

    def trailing(row: int) -> str:
        return comments.get(row, "") if row not in whole_line else ""

    def dotted(node) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.insert(0, node.attr)
            node = node.value
        return ".".join(parts) if isinstance(node, ast.Name) and parts else None

    docs: dict[str, str] = {}
    func = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "get_config")
    for node in func.body:  # top level only: the variants' branches re-set values, their comments say why
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and dotted(node.targets[0])):
            continue
        name = dotted(node.targets[0])
        docs[name] = trailing(node.lineno) or trailing(node.end_lineno) or above(node.lineno)
        value = node.value
        if isinstance(value, ast.Call) and value.args and isinstance(value.args[0], ast.Call):
            for kw in value.args[0].keywords:  # ConfigDict(dict(k=v, ...)): one doc per key on its own line
                row = kw.value.lineno
                if kw.arg and row != node.lineno:
                    docs[f"{name}.{kw.arg}"] = trailing(kw.value.end_lineno) or above(row)
    return docs  # in the file's order; "" where nothing is written


def field_doc(docs: dict[str, str], field: str) -> str:
    """The doc of `field`, else the first sentence of its nearest documented section's."""
    parts = field.split(".")
    if docs.get(field):
        return docs[field]
    for k in range(len(parts) - 1, 0, -1):
        section = docs.get(".".join(parts[:k]))
        if section:
            return re.split(r"(?<=\.)\s", section, maxsplit=1)[0]
    return ""


def config_listing(config, config_file: str) -> str:
    """Every field of `config` as `name = value  # doc`, in the config file's order of sections."""
    path = config_file.rsplit(":", 1)[0] if not config_file.endswith(".py") else config_file
    docs = field_docs(path)
    flat = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(config.to_dict())
    order = {name: i for i, name in enumerate(docs)}
    names = sorted(flat, key=lambda n: (order.get(n.split(".")[0], len(order)), order.get(n, len(order)), n))
    rows = [(f"{n} = {flat[n]!r}", field_doc(docs, n)) for n in names]
    width = max(len(r) for r, _ in rows)
    head = f"Config fields of {config_file} (set any with --config.<field>=<value>):"
    return "\n".join([head] + [f"  {r:{width}}  # {d}" if d else f"  {r}" for r, d in rows])


def _without_orbax_tracebacks(record) -> bool:
    if "orbax" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def main(argv):
    if len(argv) > 1:
        sys.exit(fail(ValueError(f"unexpected arguments {argv[1:]}; config fields go as --config.<field>=<value>.")))
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; our progress lines go to stdout
        logging.set_verbosity(logging.WARNING)
        # Orbax logs a failed background write with tracebacks from several threads; the error line says it all.
        logging.get_absl_handler().addFilter(_without_orbax_tracebacks)
    # Imported after flag parsing: keeps --help fast and leaves JAX uninitialised until the distributed set-up.
    from trigflow_distill.common import distributed

    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if flags.FLAGS.print_config:
        print(config_listing(config, config_flags.get_config_filename(flags.FLAGS["config"])))
        return
    if workdir is None:
        sys.exit(fail(ValueError("--workdir is required: the run's directory, e.g. --workdir=/tmp/run.")))
    try:
        distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
        hint = cli.accelerator_hint()
        if hint and distributed.is_main_process():  # a CPU jaxlib on a GPU/TPU machine would train for days
            print(hint, file=sys.stderr, flush=True)
        # Only now: importing the networks may already touch the JAX backend.
        from trigflow_distill import data_kinds
        from trigflow_distill.training import loop, run_config

        kind = data_kinds.get(config)
        run_config.validate_config(config)
        source, write_samples = kind.open(config)
        loop.train(config, workdir, source, write_samples)
        if config.eval.at_end and kind.evaluate is None:
            print(f"config.eval.at_end: data.kind={config.data.kind!r} has no evaluation; skipped.")
        elif config.eval.at_end and distributed.is_single_process():
            cli.say(f"evaluating the run ({config.data.kind}) -> {workdir}")
            kind.evaluate(workdir)
        elif config.eval.at_end and distributed.is_main_process():
            print(
                "Multi-host run: evaluate on one host with "
                f"`python -m trigflow_distill.toy.evaluate --workdir={workdir}`."
            )
    except CLI_ERRORS as e:
        sys.exit(fail(e))


def run() -> None:
    """The console-script entry point (`trigflow-train`); main.py calls it too."""
    cli.run_absl(main, flags_parser=parse_flags)
