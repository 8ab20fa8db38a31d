"""`lossd-server` / `python -m lossd_server`."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from . import config as config_mod


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_mod.load(argv)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .ports import StartupError

    try:
        if cfg.workers > 1:  # a supervisor of worker processes: no grpc, no torch in this process
            from . import workers

            return workers.serve(cfg)
        from . import allocator
        from .app import serve

        allocator.tune()
        asyncio.run(serve(cfg))
    except StartupError as exc:
        print(f"lossd-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
