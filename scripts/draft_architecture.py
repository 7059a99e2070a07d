"""Draft evomerge/architectures/<family>.json from the tensors transformers 5 saves for a tiny random model
(run from the repository root: `python scripts/draft_architecture.py [family ...]`); review the draft by hand."""
import json, os, re, sys, tempfile
from transformers import AutoConfig, AutoModelForCausalLM
from safetensors import safe_open
BASE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family -> (model_type, extra config, [variant configs that add optional tensors], num_experts_key, layer_attributes)
FAM = {
 "llama": ("llama", {}, [dict(attention_bias=True, mlp_bias=True)], None, []),
 "mistral": ("mistral", {}, [], None, []),
 "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), [], "num_local_experts", []),
 "qwen2": ("qwen2", {}, [], None, ["layer_types"]),
 "qwen3": ("qwen3", {}, [dict(attention_bias=True)], None, ["layer_types"]),
 "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), [dict(attention_bias=True)], "num_experts", ["layer_types"]),
 "gemma": ("gemma", dict(head_dim=16), [], None, []),
 "gemma2": ("gemma2", dict(head_dim=16), [], None, ["layer_types"]),
 "gemma3": ("gemma3_text", dict(head_dim=16), [], None, ["layer_types"]),
 "phi3": ("phi3", {}, [], None, []),
 "stablelm": ("stablelm", {}, [dict(use_qkv_bias=True)], None, []),
 "olmo2": ("olmo2", {}, [], None, []),
 "starcoder2": ("starcoder2", {}, [], None, []),
 "granite": ("granite", {}, [dict(attention_bias=True, mlp_bias=True)], None, []),
 "cohere": ("cohere", {}, [dict(use_qk_norm=True)], None, []),
}
LIVE = {  # checkpoint expert tensor suffix -> (fused live suffix, chunk) as transformers 5 loads them
 "block_sparse_moe.experts.${expert_index}.w1.weight": ("mlp.experts.gate_up_proj", [0, 2]),
 "block_sparse_moe.experts.${expert_index}.w3.weight": ("mlp.experts.gate_up_proj", [1, 2]),
 "block_sparse_moe.experts.${expert_index}.w2.weight": ("mlp.experts.down_proj", None),
 "block_sparse_moe.gate.weight": ("mlp.gate.weight", None),
 "mlp.experts.${expert_index}.gate_proj.weight": ("mlp.experts.gate_up_proj", [0, 2]),
 "mlp.experts.${expert_index}.up_proj.weight": ("mlp.experts.gate_up_proj", [1, 2]),
 "mlp.experts.${expert_index}.down_proj.weight": ("mlp.experts.down_proj", None),
}
def saved(mt, kw):
    cfg = AutoConfig.for_model(mt, **{**BASE, **kw})
    m = AutoModelForCausalLM.from_config(cfg)
    d = tempfile.mkdtemp(); m.save_pretrained(d)
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    return m, keys
def tmpl(k):
    k = re.sub(r"\.layers\.\d+\.", ".layers.${layer_index}.", k)
    return re.sub(r"\.experts\.\d+\.", ".experts.${expert_index}.", k)
for fam in sys.argv[1:] or FAM:
    mt, kw, variants, nek, attrs = FAM[fam]
    m, keys = saved(mt, {**kw, "tie_word_embeddings": False})
    order = list(dict.fromkeys(tmpl(k) for k in m.state_dict().keys()))
    base_t = list(dict.fromkeys(tmpl(k) for k in keys))
    opt = []
    for v in variants:
        _, vk = saved(mt, {**kw, **v, "tie_word_embeddings": False})
        opt += [t for t in dict.fromkeys(tmpl(k) for k in vk) if t not in base_t and t not in opt]
    all_t = base_t + opt
    # keep transformers' module order for layer tensors
    def w(t):
        o = {"name": t}
        if t in opt: o["optional"] = True
        if t == "model.embed_tokens.weight": o["is_embed"] = True
        if t == "lm_head.weight":
            o.update(optional=True, is_embed=True, tied_names=["model.embed_tokens.weight"])
        for suf, (live, chunk) in LIVE.items():
            if t.endswith(suf) and nek:
                o["live"] = {"name": t[: -len(suf)] + live}
                if "${expert_index}" in t: o["live"]["expert"] = True
                if chunk: o["live"]["chunk"] = chunk
        return o if len(o) > 1 else t
    layer = [t for t in all_t if "${layer_index}" in t]
    pre = [t for t in all_t if "${layer_index}" not in t and "embed" in t]
    post = [t for t in all_t if "${layer_index}" not in t and "embed" not in t]
    post.sort(key=lambda t: t == "lm_head.weight")
    out = {"name": fam, "model_types": [mt], "architectures": m.config.architectures or [type(m).__name__],
           "num_layers_key": "num_hidden_layers"}
    if nek: out["num_experts_key"] = [nek]  # qwen3_moe also takes "num_experts" (older configs): add by hand
    if attrs: out["layer_attributes"] = attrs
    out |= {"pre_weights": [w(t) for t in pre], "layer_weights": [w(t) for t in layer], "post_weights": [w(t) for t in post]}
    path = f"evomerge/architectures/{fam}.json"
    if os.path.exists(path):  # keep extra architecture aliases already listed
        old = json.load(open(path)); out["architectures"] = list(dict.fromkeys(out["architectures"] + old["architectures"]))
    json.dump(out, open(path, "w"), indent=2); open(path, "a").write("\n")
    print(fam, len(layer), "layer tensors,", len(opt), "optional")
