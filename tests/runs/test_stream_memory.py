"""A streamed corpus larger than the memory the training process may take: reading the file whole fails with
MemoryError under that limit, while a run streams through all of it (skipping to its last documents) and trains."""
import json, re, subprocess, sys, textwrap, time

from run_helpers import ROOT, checkout_env

CORPUS_MB = 300
LIMIT_MB = 150      # what the process may grow by once the training stack is set up: half the corpus

CHILD = """
import os, resource, sys, time
import transformers
from ftlab.config import load_config
from ftlab.run import Run

def vm_data():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData:"))

corpus, skip, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
folder = os.path.dirname(corpus)
def config(path, skip, out):
    return load_config(f"base_model: ftlab:tiny\\nsequence_len: 64\\nsample_packing: true\\nmicro_batch_size: 2\\n"
                       f"max_steps: 5\\nsave_steps: 100\\noutput_dir: {folder}/{out}\\n"
                       f"pretraining_dataset:\\n  - path: {path}\\n    skip: {skip}\\n")
# The training stack (torch, TRL, the allocator's arenas) is set up by a run on a small file first: the limit that
# follows bounds what a run on the corpus adds, not what importing and building a trainer takes.
small = os.path.join(folder, "small.jsonl")
with open(corpus) as f, open(small, "w") as g: g.writelines(f.readline() for _ in range(2000))
Run(config(small, 0, "warm")).train()
base = vm_data()
resource.setrlimit(resource.RLIMIT_DATA, (base + limit, base + limit))
try:
    with open(corpus) as f: f.read()
    print("read whole: ok")
except MemoryError:
    print("read whole: MemoryError")
seen = []
step = transformers.Trainer.training_step
def recording(self, model, inputs, *args, **kw):
    seen.append(inputs["input_ids"][0].tolist())
    return step(self, model, inputs, *args, **kw)
transformers.Trainer.training_step = recording
start = time.time()
run = Run(config(corpus, skip, "big")).train()
print(f"trained: {run.state} in {time.time() - start:.1f}s, grew {(vm_data() - base) / 2**20:.0f} MB")
print("first row:", run.tokenizer.decode(seen[0]))
"""


def test_a_corpus_larger_than_the_memory_limit_streams_and_trains(tmp_path):
    t = time.time()
    corpus, n, size = tmp_path / "corpus.jsonl", 0, 0
    body = " ".join("the cat sat on a mat while rain fell over old hills and quiet rivers".split() * 6)
    with open(corpus, "w") as f:
        while size < CORPUS_MB << 20:
            block = "".join(json.dumps({"text": f"Doc {n + k}: {body}"}) + "\n" for k in range(20000))
            f.write(block); n += 20000; size += len(block)
    written = time.time() - t
    skip = n - 10_000          # the run's first documents are the corpus's last: the stream read through all of it
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(corpus), str(skip), str(LIMIT_MB)],
                          env=checkout_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert size > 2 * (LIMIT_MB << 20) and "read whole: MemoryError" in out
    grew = int(re.search(r"trained: finished in [\d.]+s, grew (\d+) MB", out).group(1))
    assert grew < LIMIT_MB
    first = int(re.search(r"first row: .*?Doc (\d+):", out).group(1))
    assert skip <= first < n, out
    print(f"corpus {size / 2**20:.0f} MB written in {written:.1f}s; limit +{LIMIT_MB} MB; streamed run grew {grew} MB")
