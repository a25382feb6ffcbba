#!/usr/bin/env python3
"""Read the TensorBoard event files vlp writes (RUN/tb) with TensorBoard's own reader.

Usage: read_tensorboard.py TB_DIR

Loads every event file in TB_DIR with
`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` (all scalars
kept, the restart handling TensorBoard applies to a resumed run included) and prints
JSON: {"tensorboard_version": ..., "scalars": {tag: [[step, value], ...]}}, each tag's
events in the order TensorBoard keeps them. Exits 0 on success, 2 on bad usage.
"""

import json
import sys


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2

    import tensorboard
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(argv[1], size_guidance={SCALARS: 0})
    acc.Reload()
    scalars = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)]
        for tag in acc.Tags()[SCALARS]
    }
    print(json.dumps({"tensorboard_version": tensorboard.__version__, "scalars": scalars}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
