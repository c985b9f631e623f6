// tok MODEL FILE...: prints, a line each, the ids llama.cpp gives each
// file's whole content (llama_tokenize with add_special and parse_special),
// loading only the vocabulary. For gemma3_llama_cpp_ids.py.
#include "llama.h"
#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>
#include <string>
#include <chrono>
int main(int argc, char ** argv) {
    llama_backend_init();
    auto mp = llama_model_default_params();
    mp.vocab_only = true;
    auto t0 = std::chrono::steady_clock::now();
    llama_model * m = llama_model_load_from_file(argv[1], mp);
    auto t1 = std::chrono::steady_clock::now();
    fprintf(stderr, "load %.3f s\n", std::chrono::duration<double>(t1-t0).count());
    const llama_vocab * v = llama_model_get_vocab(m);
    for (int i = 2; i < argc; i++) {
        std::ifstream f(argv[i], std::ios::binary); std::stringstream ss; ss << f.rdbuf();
        std::string s = ss.str();
        std::vector<llama_token> out(s.size() + 16);
        int n = llama_tokenize(v, s.data(), s.size(), out.data(), out.size(), true, true);
        printf("[");
        for (int j = 0; j < n; j++) printf("%s%d", j ? ", " : "", out[j]);
        printf("]\n");
    }
    return 0;
}
