"""``regpipe train`` that also records the sample ids each rank trained on (run under torchrun by the tests).

Usage: python shard_probe.py DEST_DIR train [regpipe train options]; writes DEST_DIR/rank<RANK>.json with
``{epoch: [ids...]}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from regpipe.cli.command import build_parser
from regpipe.cli.options import build_config
from regpipe.engine.train import train


def main() -> None:
    dest = Path(sys.argv[1])
    args = build_parser().parse_args(sys.argv[2:])
    seen: dict[int, list[int]] = {}
    train(build_config(args), observe=lambda epoch, batch: seen.setdefault(epoch, []).extend(
        batch.source_ids.tolist()))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
