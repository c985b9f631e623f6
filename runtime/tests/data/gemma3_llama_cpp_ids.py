# Writes gemma3_llama_cpp_ids.json: the texts below tokenized by llama.cpp.
# Build gemma3_llama_cpp_tok.cpp against a llama.cpp build (here the one
# vendored in llama-cpp-python 0.3.36, static libs), as ./tok, then
#   python3 gemma3_llama_cpp_ids.py GEMMA3.gguf gemma3_llama_cpp_ids.json
import json, subprocess, random, sys
texts = [
 "", " ", "  ", "a", " a", "Hello world", "Hello  world", "Hello   world\n", "\n\n\n", "\t\tindented\n    code();",
 "The capital of France is", "  leading and trailing  ", "tabs\tand\r\nCRLF\r\n",
 "<start_of_turn>user\nWrite a poem.<end_of_turn>\n<start_of_turn>model\n",
 "<start_of_turn>", "<end_of_turn>text<eos>more<bos>", "<unused0><unused99> <mask>",
 "<h1>Title</h1>\n<p>para <strong>bold</strong></p>", "x<h1>y", "<start_of_turn<end_of_turn>",
 "日本語のテキストです。中文也可以！", "Привет, мир! Как дела?", "नमस्ते दुनिया", "مرحبا بالعالم", "한국어 텍스트 \u1100\u1161\u11a8",
 "emoji 😀🎉👩‍👩‍👧 and 𠀀𪚥 rare", "\u0378\u0379 unassigned \x01\x02\x7f", "e\u0301 combining é", "▁literal▁marks ▁▁ x▁ y",
 "def f(x):\n    return x ** 2  # square\n", "1234567890 3.14159 1,000,000", "'s 'll 'd it's don't", "a>▁</b > </c",
 "https://example.com/path?q=1&r=2#frag", "     many     spaces     ", "\u00a0nbsp\u3000ideographic space", "end with newline\n",
]
rng = random.Random(7)
parts = ["a","b","word"," ","  ","   ","\n","\n\n"," \n","\t","0","42","123","'s",".",",","!","...","é","e\u0301","한","😀","²","<start_of_turn>","<end_of_turn>","<start_of","_turn>","the cat sat","hello, world! ","(x)","\"q\"","中文","。","x.y","слово ","नमस्ते ","\u00a0","\u3000","<h1>","</h1>","<br>","\r\n","▁","x▁","\u0378"]
for seed in range(4):
    s = ""
    while len(s.encode()) < 3000: s += rng.choice(parts)
    texts.append(s)
# Longer than a piece (4096 bytes) with no newline, so that it is cut.
rng2 = random.Random(11)
nl_free = [p for p in parts if "\n" not in p and "turn" not in p]
s = ""
while len(s.encode()) < 12000: s += rng2.choice(nl_free)
texts.append(s)
out = []
for i, t in enumerate(texts):
    open(f"fx/{i}.txt", "wb").write(t.encode())
res = subprocess.run(["./tok", sys.argv[1]] + [f"fx/{i}.txt" for i in range(len(texts))], capture_output=True, text=True).stdout.splitlines()
assert len(res) == len(texts)
for t, r in zip(texts, res):
    out.append({"text": t, "ids": json.loads(r)})
json.dump({"source": "llama.cpp (llama-cpp-python 0.3.36 vendored), llama_tokenize(add_special=true, parse_special=true) on gemma-3-270m-q4_k_m.gguf", "cases": out}, open(sys.argv[2], "w"), ensure_ascii=False, indent=None, separators=(",", ":"))
print(len(out), sum(len(o["ids"]) for o in out))
