/* Generate with a LoRA adapter attached at scale 1, then at scale 0 (the
 * base alone), through lorafold's C API.
 *
 *   cc generate.c -I ffi/include target/release/liblorafold.a -lpthread -ldl -lm -o generate
 *   ./generate MODEL.gguf ADAPTER.gguf "What is the capital of Portugal?"
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "lorafold.h"

#define CHECK(call)                                                        \
    do {                                                                   \
        lorafold_status s_ = (call);                                       \
        if (s_ != LORAFOLD_OK) {                                           \
            fprintf(stderr, "%s: error %d: %s\n", #call, s_, lorafold_last_error()); \
            return 1;                                                      \
        }                                                                  \
    } while (0)

static bool print_piece(const char *piece, size_t len, void *user) {
    size_t *printed = user;
    fwrite(piece, 1, len, stdout);
    *printed += len;
    return true; /* false stops generation */
}

static int answer(lorafold_model *model, const char *prompt, const char *label) {
    lorafold_session *session = NULL;
    CHECK(lorafold_session_new(model, &session));
    lorafold_sampling params = lorafold_sampling_default();
    params.chat = true;
    params.max_tokens = 40;
    size_t printed = 0, n = 0;
    printf("[%s] ", label);
    CHECK(lorafold_generate(session, prompt, &params, print_piece, &printed, &n));
    printf("\n");
    /* Sessions must be freed before the model's adapters change. */
    CHECK(lorafold_session_free(session));
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf ADAPTER.gguf PROMPT\n", argv[0]);
        return 2;
    }
    lorafold_model *model = NULL;
    lorafold_adapter *adapter = NULL;
    int32_t slot = -1;
    CHECK(lorafold_model_load(argv[1], 0, 256, &model));
    CHECK(lorafold_adapter_load(argv[2], &adapter));
    CHECK(lorafold_model_attach(model, adapter, 1.0f, &slot));
    if (answer(model, argv[3], "scale 1")) return 1;
    CHECK(lorafold_model_set_scale(model, slot, 0.0f));
    if (answer(model, argv[3], "scale 0")) return 1;
    CHECK(lorafold_adapter_free(adapter));
    CHECK(lorafold_model_free(model));
    return 0;
}
