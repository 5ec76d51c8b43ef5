"""``regpipe train`` that also records the sample ids each rank trained on (run under torchrun by the tests).

Usage: python shard_probe.py DEST_DIR train [regpipe train options]; writes DEST_DIR/rank<RANK>.json with
``{epoch: [ids...]}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from regpipe.cli.train import parse_train
from regpipe.engine.train import train


def main() -> None:
    dest = Path(sys.argv[1])
    if sys.argv[2] != "train":
        raise SystemExit(f"usage: {__doc__}")
    cfg = parse_train(sys.argv[3:])
    seen: dict[int, list[int]] = {}
    train(cfg, observe=lambda epoch, batch: seen.setdefault(epoch, []).extend(
        batch.source_ids.tolist()))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
