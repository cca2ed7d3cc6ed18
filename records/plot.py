"""Plot the val NELBO of training runs from their logs, against train time and against training tokens.

    python records/plot.py logs/RUN.txt [logs/OTHER.txt ...] --out=curve.png

One curve per log, named by its file, with the record target drawn. Training tokens at a validation are the steps
before it times batch_size x seq_len. Like check.py it reads logs only; it needs matplotlib (requirements-dev.txt).
"""

import argparse, json, sys
from pathlib import Path

from check import TARGET, MalformedLog, parse_log

def read_curve(path: Path) -> tuple[list[float], list[int], list[float]]:
    """(train time in minutes, training tokens, val NELBO) at each validation of the run logged in `path`."""
    try:
        log = parse_log(path.read_text(encoding="utf-8"))
        config = json.loads(log.header["config"]["json"])
        tokens_per_step = config["batch_size"] * config["seq_len"]
    except (OSError, UnicodeDecodeError) as error:
        raise MalformedLog(f"cannot read {path} ({error})") from None
    except (MalformedLog, json.JSONDecodeError, KeyError, TypeError) as error:
        raise MalformedLog(f"{path} is not a train.py log ({error})") from None
    if not log.val_lines:
        raise MalformedLog(f"{path} has no val_loss line")
    return ([int(m["ms"]) / 60_000 for m in log.val_lines], [int(m["step"]) * tokens_per_step for m in log.val_lines],
            [float(m["loss"]) for m in log.val_lines])

def plot(curves: dict[str, tuple], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, (minutes, tokens, losses) in curves.items():
        by_time.plot(minutes, losses, marker="o", label=name)
        by_tokens.plot(tokens, losses, marker="o", label=name)
    for axes, label in ((by_time, "train time (minutes, validation excluded)"), (by_tokens, "training tokens")):
        axes.axhline(TARGET, color="gray", linestyle="--", label=f"record target {TARGET}")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    by_time.set_ylabel("val NELBO (nats/token)")
    by_tokens.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot val NELBO curves from train.py logs.")
    parser.add_argument("logs", type=Path, nargs="+", help="train.py logs (logs/<run_id>.txt)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    names = [path.stem for path in args.logs]
    if len(set(names)) < len(names):  # the same run id in two folders
        names = [str(path) for path in args.logs]
    try:
        import matplotlib  # noqa: F401

        curves = {name: read_curve(path) for name, path in zip(names, args.logs)}
        plot(curves, args.out)
    except ImportError:
        problem = "records/plot.py needs matplotlib: pip install -r requirements-dev.txt"
    except MalformedLog as error:
        problem = str(error)
    except OSError as error:  # read_curve turns a log's OSError into MalformedLog: this one is the PNG's
        problem = f"cannot write {args.out} ({error})"
    else:
        print(f"wrote {args.out}: {len(curves)} run{'s' * (len(curves) > 1)}")
        return 0
    print(f"error: {problem}", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(main())
