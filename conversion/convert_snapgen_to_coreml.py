#!/usr/bin/env python
"""Convert a SnapGen pipeline to Core ML packages in the layout of apple/coreml-stable-diffusion-* Hub repos.

    python conversion/convert_snapgen_to_coreml.py --model PATH_OR_REPO --output DIR [--resolution 1024]
        [--target iOS18] [--variants fp16,palettize6,palettize4] [--components unet,decoder,text]
        [--push-to-hub REPO] [--dry-run]

Same as ``snapgen convert-coreml``; see ``diffusers_snapgen.coreml`` for the Python API.
"""

import sys

from diffusers_snapgen.coreml.cli import main

if __name__ == "__main__":
    sys.exit(main())
