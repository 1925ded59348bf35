# Sourced by the CPU study scripts: sets DATA to the CIFAR-10 folder and exits 2 with one line
# if there is none. Order: KFCRUN_CIFAR10_DIR, else data/cifar10 (the default dataset.root),
# else the developers' shared copy beside the repository.
# Usage: ROOT=<repo> . "$ROOT/scripts/cifar10_dir.sh" <script name for the message>
DATA="${KFCRUN_CIFAR10_DIR:-$ROOT/data/cifar10}"
if [ -z "${KFCRUN_CIFAR10_DIR:-}" ] && [ ! -d "$DATA" ] && [ -d "$ROOT/../shared/data/cifar10" ]; then
  DATA="$ROOT/../shared/data/cifar10"
fi
if [ ! -d "$DATA/train" ] && [ ! -d "$DATA/cifar-10-batches-py" ]; then
  echo "$1: no CIFAR-10 at $DATA; fix: set KFCRUN_CIFAR10_DIR=<dir with train/ and test/>" >&2
  exit 2
fi
