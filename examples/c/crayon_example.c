/*
 * crayon_example: generate and customize through libcrayon, against a running crayond.
 *
 *   cc -Wall -Wextra -O2 -I include examples/c/crayon_example.c -L target/release -lcrayon -o crayon_example
 *   LD_LIBRARY_PATH=target/release ./crayon_example /run/crayon/crayon.sock "Why is the sky blue?"
 *
 * Arguments (all optional): socket path (default: $CRAYON_SOCKET, else /run/crayon/crayon.sock),
 * prompt, and max tokens. Exit status: 0 on success, else the failing call's crayon_status.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crayon.h"

/* Streams tokens to stdout as they come; counts them in *user_data. Return 0 to go on. */
static int32_t print_token(const char *text, size_t len, void *user_data)
{
    size_t *count = user_data;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    (*count)++;
    return 0;
}

static int fail(const char *what, crayon_status status)
{
    fprintf(stderr, "crayon_example: %s failed: %s: %s\n", what, crayon_status_name(status), crayon_last_error());
    return (int)status;
}

int main(int argc, char **argv)
{
    const char *socket_path = argc > 1 && argv[1][0] ? argv[1] : NULL;
    const char *prompt = argc > 2 ? argv[2] : "Name three primary colors.";
    unsigned max_tokens = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 10) : 24;

    printf("libcrayon %s (header %s, protocol %d)\n", crayon_version(), CRAYON_VERSION, CRAYON_PROTOCOL_VERSION);

    crayon_client *client = NULL;
    crayon_status st = crayon_client_open(socket_path, &client);
    if (st != CRAYON_OK)
        return fail("crayon_client_open", st);

    char *status = NULL;
    if ((st = crayon_get_status(client, &status)) != CRAYON_OK) {
        crayon_client_free(client);
        return fail("crayon_get_status", st);
    }
    printf("status: %.120s...\n", status);
    crayon_string_free(status);

    /* 1. The base model, streamed. */
    crayon_generate_options opts;
    crayon_generate_options_init(&opts, sizeof opts);
    opts.max_tokens = max_tokens;
    opts.temperature = 0.0f; /* greedy: the same answer every run */
    size_t tokens = 0;
    char *text = NULL;
    printf("base> ");
    st = crayon_generate(client, prompt, &opts, print_token, &tokens, &text);
    printf("\n");
    if (st != CRAYON_OK) {
        crayon_client_free(client);
        return fail("crayon_generate", st);
    }
    printf("(%zu streamed pieces, %zu bytes)\n", tokens, strlen(text));
    crayon_string_free(text);

    /* 2. Customize from three examples: the service blends its adapter pool in milliseconds. */
    const char *inputs[] = {"What is 2 + 2?", "What is 3 + 5?", "What is 10 - 4?"};
    const char *outputs[] = {"4", "8", "6"};
    char *report = NULL;
    st = crayon_customize(client, "c-example-math", inputs, outputs, 3, &report);
    if (st != CRAYON_OK) {
        crayon_client_free(client);
        return fail("crayon_customize", st);
    }
    printf("customized: %.200s...\n", report);
    crayon_string_free(report);

    /* 3. The customized adapter answers, without streaming (NULL callback). */
    opts.adapter = "c-example-math";
    st = crayon_generate(client, "What is 7 + 1?", &opts, NULL, NULL, &text);
    if (st != CRAYON_OK) {
        crayon_client_free(client);
        return fail("crayon_generate (adapter)", st);
    }
    printf("c-example-math> %s\n", text);
    crayon_string_free(text);

    /* 3b. A choice question: the options are scored by likelihood, nothing is sampled. */
    const char *options[] = {"6", "8", "9"};
    size_t chosen = 0;
    char *scores = NULL;
    st = crayon_choose(client, "What is 7 + 1?", &opts, options, 3, &chosen, &scores);
    if (st != CRAYON_OK) {
        crayon_client_free(client);
        return fail("crayon_choose", st);
    }
    printf("choice> %s (%s)\n", chosen < 3 ? options[chosen] : "none", strstr(scores, "choice_scores") ? "scored" : "?");
    crayon_string_free(scores);

    /* 4. Errors are codes plus messages: an adapter that does not exist. */
    opts.adapter = "no-such-adapter";
    st = crayon_generate(client, "hello", &opts, NULL, NULL, NULL);
    printf("unknown adapter -> %s: %s\n", crayon_status_name(st), crayon_last_error());
    if (st == CRAYON_OK) {
        crayon_client_free(client);
        return 1;
    }

    /* 5. Clean up the adapter we made. */
    if ((st = crayon_remove_adapter(client, "c-example-math")) != CRAYON_OK) {
        crayon_client_free(client);
        return fail("crayon_remove_adapter", st);
    }
    char *list = NULL;
    if ((st = crayon_list_adapters(client, &list)) != CRAYON_OK) {
        crayon_client_free(client);
        return fail("crayon_list_adapters", st);
    }
    printf("adapters now: %s\n", list);
    crayon_string_free(list);

    crayon_client_free(client);
    printf("ok\n");
    return 0;
}
