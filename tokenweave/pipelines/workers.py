"""The critical-token pipeline's sampling and scoring in the processes of ``accelerate launch``.

``python -m tokenweave.pipelines.workers {sample,score} --arguments ARGUMENTS.json --output DIR [launch flags]``
re-runs itself under ``accelerate launch`` (:func:`tokenweave.launch.relaunch`). Each launched process loads the
model(s) on its own device and computes its share of the batches (:class:`~tokenweave.inference.shards.Shard`: the
same dataset whatever the number of processes); the results are gathered once and process 0 saves the dataset to
``DIR``. The pipeline calls it through :func:`run_launched_work`; without launch flags the pipeline calls the same
functions in its own process. Several machines need ``DIR`` and the arguments' paths on a shared filesystem, as the
training steps do.

============  ===============================================================================  ==================
work          arguments (JSON)                                                                 output
============  ===============================================================================  ==================
``sample``    the keywords of :func:`~tokenweave.inference.sampling.sample_trajectories`       labelled samples
``score``     ``dataset`` (a saved pairs dataset) and the keywords of                          the scored pairs
              :func:`~tokenweave.inference.scoring.score_with_models`
============  ===============================================================================  ==================
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from datasets import Dataset, load_from_disk

from ..inference.sampling import sample_trajectories
from ..inference.scoring import score_with_models
from ..inference.shards import Shard, this_process_shard
from ..launch import relaunch, run_launched

MODULE = "tokenweave.pipelines.workers"


def _sample(arguments: dict, shard: Shard) -> Dataset:
    return sample_trajectories(**arguments, shard=shard)


def _score(arguments: dict, shard: Shard) -> Dataset:
    arguments = dict(arguments)
    return score_with_models(load_from_disk(arguments.pop("dataset")), **arguments, shard=shard)


WORKS = {"sample": _sample, "score": _score}


def run_launched_work(work: str, arguments: dict, output: Path, launch: dict) -> None:
    """Run ``work`` (module docstring) with ``arguments`` under ``accelerate launch`` with the launch flags
    ``launch`` (none: in one process of its own), into ``output`` (which must not exist yet)."""
    # beside the output, so that the processes of other machines read it too (a shared filesystem)
    with tempfile.TemporaryDirectory(dir=Path(output).parent, prefix=f".{work}-arguments-") as directory:
        arguments_file = Path(directory) / "arguments.json"
        arguments_file.write_text(json.dumps(arguments))
        run_launched(MODULE, [work, "--arguments", str(arguments_file), "--output", str(output)], launch)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if relaunch(MODULE, argv):
        return
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("work", choices=sorted(WORKS))
    parser.add_argument("--arguments", required=True, help="A JSON file of the work's keyword arguments.")
    parser.add_argument("--output", required=True, help="Directory the dataset is saved to (by process 0).")
    args = parser.parse_args(argv)
    from accelerate import PartialState

    shard = this_process_shard()
    dataset = WORKS[args.work](json.loads(Path(args.arguments).read_text()), shard)
    if shard.is_main:
        dataset.save_to_disk(args.output)
    print(f"[{args.work}] process {shard.index} of {shard.count} done ({shard.device})", flush=True)
    state = PartialState()  # the one this_process_shard set up
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
