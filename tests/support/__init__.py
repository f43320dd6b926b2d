"""What tests share: real servers (PostgreSQL, routers, moto, a Kubernetes API emulator and
kubelet, a whole mesh), the one ``until`` and the one logged-process helper. Never a test
module: tests import from here, conftest.py only wires these into fixtures; the benches
import from here too."""
