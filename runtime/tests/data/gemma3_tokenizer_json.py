#!/usr/bin/env python3
"""A Gemma 3 tokenizer.json rebuilt from the GGUF's vocabulary the way HF's
SpmConverter builds one from tokenizer.model (BPE with byte fallback, merges
generated from the scores, added tokens for control and user-defined ones),
for converter/src/hf_tokenizer.rs's ignored test
gemma3_tokenizer_json_tokenizes_as_its_gguf.

    python3 gemma3_tokenizer_json.py GEMMA3.gguf OUT_DIR
"""
import json, struct, sys

def read_kv(path):
    f = open(path, 'rb')
    def u(fmt):
        return struct.unpack('<' + fmt, f.read(struct.calcsize('<' + fmt)))[0]
    def s():
        return f.read(u('Q')).decode('utf-8', 'surrogatepass')
    ty = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}
    def val(t):
        if t == 8:
            return s()
        if t == 9:
            et = u('I'); n = u('Q')
            return [val(et) for _ in range(n)]
        return u(ty[t])
    assert f.read(4) == b'GGUF'
    u('I'); u('Q'); n_kv = u('Q')
    kv = {}
    for _ in range(n_kv):
        k = s(); kv[k] = val(u('I'))
    return kv

kv = read_kv(sys.argv[1])
T = kv['tokenizer.ggml.tokens']; S = kv['tokenizer.ggml.scores']; Y = kv['tokenizer.ggml.token_type']
vocab = {t: i for i, t in enumerate(T)}
# SpmConverter: normal and byte pieces take part in merges.
mergeable = {t: i for i, t in enumerate(T) if Y[i] in (1, 6)}
merges = []
for piece, i in mergeable.items():
    if Y[i] != 1:
        continue
    local = []
    for k in range(1, len(piece)):
        l, r = piece[:k], piece[k:]
        if l in mergeable and r in mergeable:
            local.append((l, r, S[i]))
    local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
    merges.extend(local)
merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": Y[i] == 3} for i, t in enumerate(T) if Y[i] in (3, 4)]
tok = {"version": "1.0", "added_tokens": added,
       "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
       "pre_tokenizer": None,
       "decoder": {"type": "Sequence", "decoders": [
           {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
           {"type": "ByteFallback"}, {"type": "Fuse"}]},
       "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": vocab, "merges": [[l, r] for l, r, _ in merges]}}
d = sys.argv[2]
json.dump(tok, open(d + '/tokenizer.json', 'w'), ensure_ascii=False)
json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
           "add_bos_token": True, "add_eos_token": False}, open(d + '/tokenizer_config.json', 'w'))
