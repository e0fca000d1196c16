"""Read ablate's TensorBoard event files with TensorBoard's own reader and print what it sees.

Usage: tensorboard_check.py RUN_DIR [RUN_DIR ...]

For each folder (one trial, `RUN_OUT/tensorboard/<trial name>/`) TensorBoard's
`EventAccumulator` loads the event files; a file it cannot parse (bad CRC, bad protobuf) makes
it raise, which fails the check. Prints one JSON object: folder -> {"scalars": {tag: [[step,
value], ...]}, "hparams": {name: value} (from the HParams plugin's session_start_info, parsed with
TensorBoard's own protobuf), "file_version": ...}. coordinator/tests/tensorboard.rs compares it
with what was written.
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata


def read(path):
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]
    }
    hparams = None
    try:
        content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    except KeyError:  # no hparams summary in this run
        content = {}
    if hp_metadata.SESSION_START_INFO_TAG in content:
        data = hp_metadata.parse_session_start_info_plugin_data(
            content[hp_metadata.SESSION_START_INFO_TAG]
        )
        hparams = {}
        for name, value in data.hparams.items():
            kind = value.WhichOneof("kind")
            hparams[name] = getattr(value, kind)
    return {
        "scalars": scalars,
        "hparams": hparams,
        "file_version": acc.file_version,
    }


def main():
    out = {path: read(path) for path in sys.argv[1:]}
    json.dump(out, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
