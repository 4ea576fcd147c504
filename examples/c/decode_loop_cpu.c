/* A complete decoding loop through the C ABI on the CPU backend: a suffix drafter proposes a tree from an
 * earlier rollout, specdec_draft_to_verify_tree puts it under the context's last token, the rejection sampler
 * verifies it against the target's logits (a toy target that prefers token (t + 1) % 8 after t), and the verified
 * tokens go back to the drafter. specdec_compaction_paths gives what specdec_tree_kv_compact would take.
 *
 * Build (after `cargo build --release`):
 *   cc -std=c99 -Iinclude examples/c/decode_loop_cpu.c target/release/libspecdec.a -lpthread -ldl -lm
 * tests/c/run.sh compiles and runs it in CI. */
#include <stdio.h>
#include <stdlib.h>

#include "specdec.h"

#define V 8

/* Exits with the library's message when a call fails. */
static void check(specdec_status status, const char* call) {
  if (status != SPECDEC_OK) {
    fprintf(stderr, "%s: %s: %s\n", call, specdec_status_string(status), specdec_last_error());
    exit(1);
  }
}

int main(void) {
  specdec_context* ctx = NULL;
  specdec_drafter* drafter = NULL;
  specdec_drafter_config config;
  int32_t context[256] = {0, 1, 2};
  int64_t length = 3;
  int32_t history[40];
  int64_t i, step;

  check(specdec_context_create_cpu(&ctx), "specdec_context_create_cpu");
  check(specdec_drafter_config_default(&config), "specdec_drafter_config_default");
  check(specdec_drafter_create(&config, &drafter), "specdec_drafter_create");

  /* An earlier rollout of prompt 7 (request 100), then request 1 of the same prompt. */
  for (i = 0; i < 40; ++i) history[i] = (int32_t)((i + 3) % V);
  check(specdec_drafter_add_request(drafter, 100, 7, context, 3), "specdec_drafter_add_request");
  check(specdec_drafter_append(drafter, 100, history, 40), "specdec_drafter_append");
  check(specdec_drafter_finish_request(drafter, 100), "specdec_drafter_finish_request");
  check(specdec_drafter_add_request(drafter, 1, 7, context, 3), "specdec_drafter_add_request");

  for (step = 0; step < 5; ++step) {
    int32_t draft_tokens[SPECDEC_MAX_DRAFTS], draft_parents[SPECDEC_MAX_DRAFTS];
    double draft_probs[SPECDEC_MAX_DRAFTS];
    int32_t tokens[SPECDEC_MAX_TREE_NODES], parents[SPECDEC_MAX_TREE_NODES];
    int32_t node_offsets[2] = {0, 0};
    float logits[SPECDEC_MAX_TREE_NODES * V];
    int64_t num_drafts = 0, match_len = 0, width = 0, node, x;
    int32_t accepted = 0, emitted[SPECDEC_MAX_TREE_NODES], nodes[SPECDEC_MAX_TREE_NODES];
    int32_t path_offsets[2], path[SPECDEC_MAX_TREE_NODES];
    const float temperature = 1.0f;
    const uint64_t seed = specdec_sample_seed(2024, 1), step_counter = (uint64_t)step;
    specdec_sampling sampling = {&temperature, NULL, NULL, &seed, &step_counter, NULL, NULL, NULL};
    specdec_verify_outputs outputs = {&accepted, emitted, nodes, NULL, NULL};

    /* 1. Propose a tree (kind 1) and put it under the context's last token. */
    check(specdec_drafter_propose(drafter, 1, SPECDEC_DRAFT_TREE, SPECDEC_MAX_DRAFTS, draft_tokens, draft_parents,
                                  draft_probs, &num_drafts, &match_len, NULL),
          "specdec_drafter_propose");
    check(specdec_draft_to_verify_tree(context[length - 1], draft_tokens, draft_parents, num_drafts, tokens, parents,
                                       &width),
          "specdec_draft_to_verify_tree");
    node_offsets[1] = (int32_t)(num_drafts + 1);

    /* 2. The target's logits after each node (a real engine runs tree attention and the model here). */
    for (node = 0; node <= num_drafts; ++node) {
      for (x = 0; x < V; ++x) logits[node * V + x] = x == (tokens[node] + 1) % V ? 9.0f : 0.0f;
    }

    /* 3. Verify: the drafts are point masses (no draft rows). */
    check(specdec_rejection_verify_tree(ctx, SPECDEC_ROWS_LOGITS_F32, logits, NULL, V, node_offsets, 1, tokens, parents,
                                        num_drafts + 1, &sampling, width, &outputs, NULL),
          "specdec_rejection_verify_tree");

    /* 4. The paths compaction takes (root first), then the verified tokens back to the drafter. */
    check(specdec_compaction_paths(&accepted, nodes, 1, width, path_offsets, path), "specdec_compaction_paths");
    check(specdec_drafter_append(drafter, 1, emitted, accepted + 1), "specdec_drafter_append");
    for (i = 0; i <= accepted; ++i) context[length++] = emitted[i];
    printf("step %d: %d of %d drafts accepted (match length %d), %d KV slots kept\n", (int)step, (int)accepted,
           (int)num_drafts, (int)match_len, (int)path_offsets[1]);
  }

  check(specdec_drafter_destroy(drafter), "specdec_drafter_destroy");
  check(specdec_context_destroy(ctx), "specdec_context_destroy");
  if (length < 3 + 10) {
    fprintf(stderr, "only %d tokens after 5 steps\n", (int)length);
    return 1;
  }
  printf("%d tokens in 5 steps\n", (int)length);
  return 0;
}
