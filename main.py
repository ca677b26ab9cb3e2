"""The training command: `python main.py --config=configs/predict25_4step.py[:tiny] --workdir=DIR` (the same as
`trigflow-train`; see trigflow_distill/train_main.py and `python main.py --help`)."""

from trigflow_distill.train_main import run

if __name__ == "__main__":
    run()
