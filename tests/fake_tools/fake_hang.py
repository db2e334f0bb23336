"""A fake tool that hangs: writes its pid and a child's pid to $FAKE_PID_DIR/<pid> files, then sleeps."""

import os
import subprocess
import sys
import time

if "--version" in sys.argv:
    sys.stderr.write("version: 1 (hang)\n")
    sys.exit(0)
d = os.environ["FAKE_PID_DIR"]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
for name, pid in (("leader", os.getpid()), ("child", child.pid)):
    with open(os.path.join(d, name + ".tmp"), "w") as f:
        f.write(str(pid))
    os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))
sys.stderr.write("llama_model_loader: loading... (hanging)\n")
sys.stderr.flush()
time.sleep(600)
