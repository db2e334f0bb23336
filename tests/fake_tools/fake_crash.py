"""A fake tool that fails the way llama.cpp does when it cannot load a model: a message, exit 1."""

import sys

if "--version" in sys.argv:
    sys.stderr.write("version: 1 (crash)\n")
    sys.exit(0)
sys.stderr.write("llama_model_load: error loading model: fake: unknown model architecture: 'nonsense'\n")
sys.stderr.write("common_init_from_params: failed to load model '%s'\n" % sys.argv[sys.argv.index("-m") + 1])
sys.stderr.write("main: error: unable to load model\n")
sys.exit(1)
