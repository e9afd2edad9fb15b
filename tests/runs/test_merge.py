"""The shard-by-shard merge equals PEFT's in-memory merge, holds about one tensor at a time, and simulates NF4 exactly."""
import json, pathlib, subprocess, sys, textwrap
import pytest, torch, transformers, peft
from ftlab.merge import base_weights, merge_lora, shards, nf4_round_trip
from ftlab.errors import FtlabError

IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 250]])


def logits(folder):
    with torch.no_grad(): return transformers.AutoModelForCausalLM.from_pretrained(str(folder))(IDS).logits


def adapter(model, folder, **kw):
    "A LoRA adapter with random B (a real delta) saved to `folder`; returns PEFT's merged model's logits."
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kw))
    pm.save_pretrained(str(folder))
    with torch.no_grad(): return pm.merge_and_unload()(IDS).logits


@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 7}),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True),
], ids=["embedding", "rslora-patterns", "dora"])
def test_tiny_merge_equals_peft(tmp_path, kw):
    base = base_weights("ftlab:tiny")
    want = adapter(transformers.AutoModelForCausalLM.from_pretrained(str(base)), tmp_path / "a", **kw)
    info = merge_lora(base, tmp_path / "a", tmp_path / "m")
    assert info["layers"] > 0 and torch.allclose(logits(tmp_path / "m"), want, atol=1e-5)
    assert (tmp_path / "m" / "generation_config.json").exists()


def small_model(folder, shard="4MB", hidden=256, inter=704, layers=6):
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=768, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(conf)
    model.save_pretrained(str(folder), max_shard_size=shard)
    return model


def test_multi_shard_merge_equals_peft(tmp_path):
    model = small_model(tmp_path / "base")
    assert len(shards(tmp_path / "base")) >= 4
    want = adapter(model, tmp_path / "a", r=8, lora_alpha=16, target_modules="all-linear")
    info = merge_lora(tmp_path / "base", tmp_path / "a", tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert info["shards"] == len(shards(tmp_path / "base")) and set(index["weight_map"].values()) == set(shards(tmp_path / "m"))
    assert torch.allclose(logits(tmp_path / "m"), want, atol=1e-5)


PEAK = """
import sys, threading, time, torch, safetensors
from ftlab.merge import merge_lora
def rss():
    "(resident, of which anonymous: held by the process, not file pages mapped from the shards) in bytes"
    got = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon"))}
    return got["VmRSS"], got["RssAnon"]
base, peak, done = rss(), [0, 0], []
def sample():
    while not done:
        now = rss(); peak[:] = [max(p, n) for p, n in zip(peak, now)]; time.sleep(0.001)
t = threading.Thread(target=sample); t.start()
merge_lora(sys.argv[1], sys.argv[2], sys.argv[3])
done.append(1); t.join()
print(peak[0] - base[0], peak[1] - base[1])
"""


def test_peak_memory_stays_near_one_shard(tmp_path):
    "A 110 MB model in 16 MB shards merges with the process growing by about one shard, not by the model."
    small_model(tmp_path / "base", shard="16MB", hidden=512, inter=1536, layers=8)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).save_pretrained(str(tmp_path / "a"))
    del model
    total = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    shard = max(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    lora = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    env = {**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "131072"}   # freed tensors go back to the OS at once
    r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "m")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak, anon = map(int, r.stdout.split()[-2:])
    print(f"model {total / 2**20:.0f} MiB, shard {shard / 2**20:.0f} MiB, adapter {lora / 2**20:.1f} MiB: peak growth "
          f"{peak / 2**20:.1f} MiB resident, {anon / 2**20:.1f} MiB of it held (anonymous)")
    assert total > 5 * shard and anon < shard + 2 * lora and peak < 2 * shard + 2 * lora + 8 * 2**20


def test_simulate_nf4_equals_the_4bit_model(tmp_path):
    "With --simulate-nf4 each quantized weight is what the 4-bit model computes with, plus the delta."
    base = base_weights("ftlab:tiny")
    fp = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    peft.get_peft_model(fp, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(str(tmp_path / "a"))
    merge_lora(base, tmp_path / "a", tmp_path / "m", simulate_nf4=True, nf4_dtype="float32")
    plain = merge_lora(base, tmp_path / "a", tmp_path / "p")
    q = transformers.AutoModelForCausalLM.from_pretrained(str(base), quantization_config=transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32))
    import bitsandbytes.functional as F
    from safetensors.torch import load_file
    got, flat = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(str(tmp_path / "p" / "model.safetensors"))
    k = q.model.layers[0].self_attn.k_proj.weight            # no LoRA on k_proj: exactly the 4-bit model's weight
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], F.dequantize_4bit(k.data, k.quant_state))
    w = q.model.layers[0].self_attn.q_proj.weight
    delta = flat["model.layers.0.self_attn.q_proj.weight"] - load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(got["model.layers.0.self_attn.q_proj.weight"], F.dequantize_4bit(w.data, w.quant_state) + delta, atol=1e-6)
    assert torch.equal(got["model.embed_tokens.weight"], flat["model.embed_tokens.weight"])   # embeddings are not quantized
    assert plain["layers"] == fp.config.num_hidden_layers


def test_adapter_for_another_model_is_one_message(tmp_path):
    base = base_weights("ftlab:tiny")
    with pytest.raises(FtlabError, match="not a|no LoRA adapter"):
        merge_lora(base, tmp_path, tmp_path / "m")
