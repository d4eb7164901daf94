"""`python -m bsdist.config`: configs/default.yaml; `--markdown`: the README's config reference."""

import sys

from bsdist.config import default_yaml, reference_markdown

sys.stdout.write(reference_markdown() + "\n" if "--markdown" in sys.argv else default_yaml())
