"""Print one of the README's first two ```bash blocks (1: the demo, 2: the tests), so CI runs the
commands exactly as a user reads them."""

import re
import sys
from pathlib import Path

blocks = re.findall(r"```bash\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(), re.S)
print(blocks[int(sys.argv[1]) - 1].strip())
