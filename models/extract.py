"""Write a loadable DMS student model (any family) from an intermediate
training checkpoint.

    python -m models.extract --config outputs/llama3.2_1b/config.yaml \
        --checkpoint outputs/llama3.2_1b/checkpoint-200 [--output DIR]
"""

import sys

from dms.training.pipeline import main_extract

if __name__ == "__main__":
    sys.exit(main_extract())
