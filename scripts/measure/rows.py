"""One JSON line per measured row, printed and appended to a file, so a stopped run keeps its rows."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


def jsonl_emitter(out: Path) -> Callable[[dict], None]:
    """A function that stamps a row with the seconds since this call, prints it and appends it to out."""
    t0 = time.time()

    def emit(row: dict) -> None:
        row["seconds"] = round(time.time() - t0, 1)
        line = json.dumps(row)
        print(line, flush=True)
        with out.open("a") as f:
            f.write(line + "\n")

    return emit
