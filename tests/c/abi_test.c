/*
 * Exercises the C ABI on the CPU backend: correct results on hand-worked cases, and every kind of bad argument
 * returning SPECDEC_INVALID_ARGUMENT with a message naming the argument. Then, where a CUDA device is usable (a
 * GPU, or the simulator under sim/run), the same primitives on device pointers and a caller's stream, checked
 * against the hand-worked results and the CPU backend's outputs. Compiled as C99 and as C++17 with
 * -Wall -Wextra -Werror by tests/c/run.sh. Prints "N passed, N failed" and exits non-zero on any failure;
 * SPECDEC_REQUIRE_GPU=1 makes a missing device a failure rather than a skip.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "specdec.h"

static int passed = 0;
static int failed = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (cond) {                                                                \
      ++passed;                                                                \
    } else {                                                                   \
      ++failed;                                                                \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                          \
  } while (0)

/* The call failed with `status` and the last error names `argument`. */
static void expect_error(specdec_status got, specdec_status want, const char* argument, int line) {
  const char* message = specdec_last_error();
  if (got == want && strstr(message, argument) != NULL) {
    ++passed;
  } else {
    ++failed;
    fprintf(stderr, "line %d: got %s (\"%s\"), want %s naming `%s`\n", line, specdec_status_string((int32_t)got),
            message, specdec_status_string((int32_t)want), argument);
  }
}
#define EXPECT_INVALID(call, argument) expect_error((call), SPECDEC_INVALID_ARGUMENT, (argument), __LINE__)

/* bf16 is the top half of an f32; these values are exact in both. */
static uint16_t bf16_of(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return (uint16_t)(bits >> 16);
}

/* fp16 bit patterns of small integers, worked by hand: sign 0, exponent bias 15, 10 mantissa bits. */
static uint16_t f16_of_small_int(int v) {
  switch (v) {
    case 0:
      return 0x0000;
    case 1:
      return 0x3C00;
    case 2:
      return 0x4000;
    case 3:
      return 0x4200;
    case 9:
      return 0x4880;
    default:
      return 0x7E00; /* NaN: not used by the cases below */
  }
}

/*
 * Two requests, V = 4. Request 0 drafted [2, 1]: row 0 argmax 2 (accepted), row 1 argmax 3 (mismatch: 3 is
 * emitted, 1 accepted). Request 1 drafted [] and its bonus row has a tie between 1 and 3 (lowest index: 1).
 */
static const float kLogits[4][4] = {{0, 1, 9, 0}, {0, 1, 2, 9}, {9, 0, 0, 0}, {0, 3, 2, 3}};
static const int32_t kOffsets[3] = {0, 2, 2};
static const int32_t kDrafts[2] = {2, 1};

static void check_greedy_result_of_request_0(const int32_t accepted[2], const int32_t emitted[6]) {
  CHECK(accepted[0] == 1);
  CHECK(emitted[0] == 2 && emitted[1] == 3 && emitted[2] == -1);
}

static void check_greedy_result(const int32_t accepted[2], const int32_t emitted[6]) {
  check_greedy_result_of_request_0(accepted, emitted);
  CHECK(accepted[0] == 1);
  CHECK(accepted[1] == 0);
  CHECK(emitted[0] == 2 && emitted[1] == 3 && emitted[2] == -1);
  CHECK(emitted[3] == 1 && emitted[4] == -1 && emitted[5] == -1);
}

static void test_greedy_every_dtype(specdec_context* ctx) {
  float logits_f32[16];
  uint16_t logits_f16[16], logits_bf16[16];
  int i;
  for (i = 0; i < 16; ++i) {
    float x = kLogits[i / 4][i % 4];
    logits_f32[i] = x;
    logits_bf16[i] = bf16_of(x);
    logits_f16[i] = f16_of_small_int((int)x);
  }
  {
    const void* inputs[3] = {logits_f32, logits_f16, logits_bf16};
    const int32_t dtypes[3] = {SPECDEC_DTYPE_F32, SPECDEC_DTYPE_F16, SPECDEC_DTYPE_BF16};
    int d;
    for (d = 0; d < 3; ++d) {
      int32_t accepted[2] = {77, 77};
      int32_t emitted[6] = {77, 77, 77, 77, 77, 77};
      specdec_status s = specdec_greedy_verify(ctx, inputs[d], dtypes[d], 4, kOffsets, 2, kDrafts, 2, 3, accepted,
                                               emitted, NULL, NULL);
      CHECK(s == SPECDEC_OK);
      CHECK(strcmp(specdec_last_error(), "") == 0);
      check_greedy_result(accepted, emitted);
    }
  }
}

static void test_greedy_bad_arguments(specdec_context* ctx) {
  int32_t accepted[2], emitted[6];
  const float* l = &kLogits[0][0];
  int32_t bad_offsets[3] = {0, 3, 2};
  int32_t bad_drafts[2] = {2, 4};
  int32_t minus_one_drafts[2] = {-1, 1};
  const char* bytes = (const char*)l;

  EXPECT_INVALID(specdec_greedy_verify(NULL, l, 0, 4, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "ctx");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 7, 4, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "logits_dtype");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 0, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "vocab_size");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, -4, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "vocab_size");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, -2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "num_requests");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, kDrafts, -1, 3, accepted, emitted, NULL, NULL),
                 "num_draft_tokens");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, kDrafts, 2, 0, accepted, emitted, NULL, NULL),
                 "emit_width");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, INT64_MAX, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "vocab_size");
  /* Sizes whose products overflow: rejected before any pointer is used. */
  EXPECT_INVALID(
      specdec_greedy_verify(ctx, l, 0, INT32_MAX, kOffsets, 2, kDrafts, INT32_MAX, 3, accepted, emitted, NULL, NULL),
      "logits");
  EXPECT_INVALID(
      specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, kDrafts, 2, INT64_MAX / 2, accepted, emitted, NULL, NULL),
      "emit_width");
  EXPECT_INVALID(specdec_greedy_verify(ctx, NULL, 0, 4, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "logits");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, NULL, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "draft_offsets");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, NULL, 2, 3, accepted, emitted, NULL, NULL),
                 "draft_tokens");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, kDrafts, 2, 3, NULL, emitted, NULL, NULL),
                 "accepted_counts");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, kDrafts, 2, 3, accepted, NULL, NULL, NULL),
                 "emitted_tokens");
  EXPECT_INVALID(specdec_greedy_verify(ctx, bytes + 2, 0, 4, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "aligned");
  /* Contents: offsets decreasing, a draft id outside the vocabulary, a -1 padded draft, too narrow an output. */
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, bad_offsets, 2, kDrafts, 2, 3, accepted, emitted, NULL, NULL),
                 "draft_offsets[1]");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, bad_drafts, 2, 3, accepted, emitted, NULL, NULL),
                 "draft_tokens[1]");
  EXPECT_INVALID(
      specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, minus_one_drafts, 2, 3, accepted, emitted, NULL, NULL),
      "draft_tokens[0]");
  EXPECT_INVALID(specdec_greedy_verify(ctx, l, 0, 4, kOffsets, 2, kDrafts, 2, 2, accepted, emitted, NULL, NULL),
                 "emit_width");
}

/*
 * With request_status a bad request is flagged alone and the call succeeds: request 0 drafted 4 (outside V = 4),
 * request 1 is as in check_greedy_result. Then request 1's bonus row holds a NaN: ROW_VALUES.
 */
static void test_greedy_request_status(specdec_context* ctx) {
  int32_t accepted[2] = {77, 77}, emitted[6] = {77, 77, 77, 77, 77, 77}, status[2] = {77, 77};
  int32_t bad_drafts[2] = {4, 1};
  float logits[16];
  int i;
  CHECK(specdec_greedy_verify(ctx, kLogits, SPECDEC_DTYPE_F32, 4, kOffsets, 2, bad_drafts, 2, 3, accepted, emitted,
                              status, NULL) == SPECDEC_OK);
  CHECK(status[0] == SPECDEC_REQUEST_DRAFT_TOKEN && status[1] == SPECDEC_REQUEST_OK);
  CHECK(accepted[0] == -1 && emitted[0] == -1 && emitted[1] == -1 && emitted[2] == -1);
  CHECK(accepted[1] == 0 && emitted[3] == 1 && emitted[4] == -1);
  CHECK(strcmp(specdec_request_status_string(status[0]), "") != 0);
  CHECK(strcmp(specdec_request_status_string(SPECDEC_REQUEST_ROW_VALUES),
               specdec_request_status_string(SPECDEC_REQUEST_DRAFT_TOKEN)) != 0);
  for (i = 0; i < 16; ++i) logits[i] = kLogits[i / 4][i % 4];
  logits[15] = NAN;
  CHECK(specdec_greedy_verify(ctx, logits, SPECDEC_DTYPE_F32, 4, kOffsets, 2, kDrafts, 2, 3, accepted, emitted, status,
                              NULL) == SPECDEC_OK);
  CHECK(status[0] == SPECDEC_REQUEST_OK && status[1] == SPECDEC_REQUEST_ROW_VALUES);
  CHECK(accepted[1] == -1);
  check_greedy_result_of_request_0(accepted, emitted);
  /* Without request_status the same call fails naming the row. */
  EXPECT_INVALID(specdec_greedy_verify(ctx, logits, SPECDEC_DTYPE_F32, 4, kOffsets, 2, kDrafts, 2, 3, accepted, emitted,
                                       NULL, NULL),
                 "logits[3");
}

static void test_empty_batch(specdec_context* ctx) {
  int32_t offsets[1] = {0};
  /* No requests: every array but the offsets is empty, so null pointers are fine. */
  CHECK(specdec_greedy_verify(ctx, NULL, SPECDEC_DTYPE_BF16, 8, offsets, 0, NULL, 0, 1, NULL, NULL, NULL, NULL) ==
        SPECDEC_OK);
}

/*
 * The suffix drafter, worked by hand: history [1 2 3 4], [1 2 3 5], [1 2 3 4 9], [7 2 3 4]; a request whose
 * prompt is [8 2 3] matches [2 3] (2 tokens, so a budget of 2), continued by 4 three times in four (0.75),
 * then [2 3 4] by 9 once in once (path 0.75).
 */
static void test_drafter(void) {
  specdec_drafter_config config;
  specdec_drafter* drafter = NULL;
  specdec_drafter_stats stats;
  const int32_t rollouts[4][5] = {{1, 2, 3, 4, 0}, {1, 2, 3, 5, 0}, {1, 2, 3, 4, 9}, {7, 2, 3, 4, 0}};
  const int64_t lengths[4] = {4, 4, 5, 4};
  const int32_t probe_prompt[3] = {8, 2, 3};
  const int32_t negative[1] = {-5};
  int32_t tokens[8], parents[8];
  double probs[8];
  int64_t count = -1, match_len = -1;
  double score = -1.0;
  uint64_t r;

  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.min_token_prob = 0.0;
  CHECK(specdec_drafter_create(&config, &drafter) == SPECDEC_OK && drafter != NULL);
  for (r = 0; r < 4; ++r) {
    CHECK(specdec_drafter_add_request(drafter, r, 1, NULL, 0) == SPECDEC_OK);
    CHECK(specdec_drafter_append(drafter, r, rollouts[r], lengths[r]) == SPECDEC_OK);
    CHECK(specdec_drafter_finish_request(drafter, r) == SPECDEC_OK);
  }
  CHECK(specdec_drafter_add_request(drafter, 10, 1, probe_prompt, 3) == SPECDEC_OK);
  CHECK(specdec_drafter_propose(drafter, 10, SPECDEC_DRAFT_CHAIN, 8, tokens, parents, probs, &count, &match_len,
                                &score) == SPECDEC_OK);
  CHECK(count == 2 && match_len == 2 && score == 1.5);
  CHECK(tokens[0] == 4 && tokens[1] == 9 && parents[0] == -1 && parents[1] == 0);
  CHECK(probs[0] == 0.75 && probs[1] == 0.75);
  /* A capacity of 1 keeps the first node. */
  CHECK(specdec_drafter_propose(drafter, 10, SPECDEC_DRAFT_TREE, 1, tokens, parents, probs, &count, &match_len, NULL) ==
        SPECDEC_OK);
  CHECK(count == 1 && tokens[0] == 4);
  CHECK(specdec_drafter_get_stats(drafter, &stats) == SPECDEC_OK);
  CHECK(stats.prompts == 1 && stats.rollouts == 5 && stats.tokens == 17 + 3 && stats.active_requests == 1);
  CHECK(stats.bytes > 0 && stats.bytes_per_token > 0.0);

  EXPECT_INVALID(
      specdec_drafter_propose(drafter, 99, SPECDEC_DRAFT_CHAIN, 8, tokens, parents, probs, &count, &match_len, NULL),
      "request");
  EXPECT_INVALID(specdec_drafter_propose(drafter, 10, 2, 8, tokens, parents, probs, &count, &match_len, NULL), "kind");
  EXPECT_INVALID(
      specdec_drafter_propose(drafter, 10, SPECDEC_DRAFT_CHAIN, 0, tokens, parents, probs, &count, &match_len, NULL),
      "capacity");
  EXPECT_INVALID(
      specdec_drafter_propose(drafter, 10, SPECDEC_DRAFT_CHAIN, 8, NULL, parents, probs, &count, &match_len, NULL),
      "out_tokens");
  EXPECT_INVALID(
      specdec_drafter_propose(drafter, 10, SPECDEC_DRAFT_CHAIN, 8, tokens, parents, probs, NULL, &match_len, NULL),
      "out_count");
  EXPECT_INVALID(
      specdec_drafter_propose(NULL, 10, SPECDEC_DRAFT_CHAIN, 8, tokens, parents, probs, &count, &match_len, NULL),
      "drafter");
  {
    /* Misaligned single-value pointers are refused, not written through (before: OK). */
    double storage[2 + 2 * sizeof(specdec_drafter_config) / sizeof(double)]; /* 8-byte aligned */
    unsigned char* scratch = (unsigned char*)storage;
    specdec_drafter* other = NULL;
    specdec_cost_model model;
    EXPECT_INVALID(specdec_drafter_propose(drafter, 10, SPECDEC_DRAFT_CHAIN, 8, tokens, parents, probs,
                                           (int64_t*)(scratch + 1), &match_len, NULL),
                   "out_count");
    EXPECT_INVALID(specdec_drafter_get_stats(drafter, (specdec_drafter_stats*)(scratch + 4)), "out");
    CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
    memcpy(scratch + 1, &config, sizeof config);
    EXPECT_INVALID(specdec_drafter_create((const specdec_drafter_config*)(scratch + 1), &other), "config");
    CHECK(other == NULL);
    EXPECT_INVALID(specdec_drafter_propose((const specdec_drafter*)((const unsigned char*)drafter + 1), 10,
                                           SPECDEC_DRAFT_CHAIN, 8, tokens, parents, probs, &count, &match_len, NULL),
                   "drafter");
    CHECK(specdec_cost_model_preset(SPECDEC_GPU_A100, SPECDEC_MODEL_QWEN25_7B, &model) == SPECDEC_OK);
    EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 0, 1, 16, 0, (double*)(scratch + 2)), "out_seconds");
  }
  EXPECT_INVALID(specdec_drafter_append(drafter, 10, negative, 1), "tokens[0]");
  EXPECT_INVALID(specdec_drafter_append(drafter, 10, NULL, 3), "tokens");
  EXPECT_INVALID(specdec_drafter_append(drafter, 10, negative, -1), "tokens");
  EXPECT_INVALID(specdec_drafter_append(drafter, 12345, negative, 0), "request");
  EXPECT_INVALID(specdec_drafter_add_request(drafter, 10, 1, NULL, 0), "request");
  EXPECT_INVALID(specdec_drafter_finish_request(drafter, 777), "request");
  EXPECT_INVALID(specdec_drafter_begin_iteration(NULL, 1), "drafter");
  CHECK(specdec_drafter_begin_iteration(drafter, 3) == SPECDEC_OK);
  EXPECT_INVALID(specdec_drafter_begin_iteration(drafter, 2), "iteration");
  CHECK(specdec_drafter_destroy(drafter) == SPECDEC_OK);
  CHECK(specdec_drafter_destroy(NULL) == SPECDEC_OK);

  /* Bad settings are named. */
  drafter = NULL;
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.min_match = 0;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "min_match");
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.total_token_budget = -1;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "total_token_budget");
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.max_draft = 0;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "max_draft");
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  CHECK(config.max_occurrences == 16 && config.min_match == 1);
  config.max_occurrences = 0;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "max_occurrences");
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.use_length_classes = 2;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "use_length_classes");
  /* Each field under its own C name (before: match_factor, token_budget, length_classes.smoothing). */
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.match_offset = NAN;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "match_offset");
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.prompt_token_budget = 0;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "prompt_token_budget");
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.total_token_budget = 0;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "total_token_budget");
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.use_length_classes = 1;
  config.length_smoothing = 0.0;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "length_smoothing");
  config.length_smoothing = 0.5;
  config.medium_threshold = config.long_threshold + 1;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "medium_threshold");
  EXPECT_INVALID(specdec_drafter_create(NULL, &drafter), "config");
  /* A draft budget is bounded, so that no setting makes a proposal's work unbounded. */
  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  config.max_draft = 1025;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "max_draft");
  config.max_draft = (int64_t)1 << 40;
  config.match_offset = 1e18;
  EXPECT_INVALID(specdec_drafter_create(&config, &drafter), "max_draft");
  CHECK(drafter == NULL);
}

/* Handles carry a type and liveness the library checks (before: a second destroy crashed or freed twice, a
 * destroyed drafter answered OK, a context passed as a drafter went unnoticed). */
static void test_handles(void) {
  specdec_drafter_config config;
  specdec_drafter* drafter = NULL;
  specdec_context* ctx = NULL;
  specdec_drafter_stats stats;
  int32_t backend = -1;
  double not_a_handle[8] = {0};

  CHECK(specdec_drafter_config_default(&config) == SPECDEC_OK);
  CHECK(specdec_drafter_create(&config, &drafter) == SPECDEC_OK);
  CHECK(specdec_context_create_cpu(&ctx) == SPECDEC_OK);

  /* The wrong type of handle, and pointers the library never returned. */
  EXPECT_INVALID(specdec_drafter_get_stats((const specdec_drafter*)ctx, &stats), "drafter");
  EXPECT_INVALID(specdec_drafter_destroy((specdec_drafter*)ctx), "drafter");
  EXPECT_INVALID(specdec_context_backend((const specdec_context*)drafter, &backend), "ctx");
  EXPECT_INVALID(specdec_context_destroy((specdec_context*)drafter), "ctx");
  EXPECT_INVALID(specdec_drafter_begin_iteration((const specdec_drafter*)not_a_handle, 1), "drafter");
  EXPECT_INVALID(specdec_context_backend((const specdec_context*)not_a_handle, &backend), "ctx");
  /* Both survived the misuse. */
  CHECK(specdec_drafter_get_stats(drafter, &stats) == SPECDEC_OK && stats.prompts == 0);
  CHECK(specdec_context_backend(ctx, &backend) == SPECDEC_OK && backend == SPECDEC_BACKEND_CPU);

  /* Destroyed handles: every call, a second destroy included, is refused. */
  CHECK(specdec_drafter_destroy(drafter) == SPECDEC_OK);
  EXPECT_INVALID(specdec_drafter_destroy(drafter), "drafter");
  EXPECT_INVALID(specdec_drafter_add_request(drafter, 1, 1, NULL, 0), "drafter");
  EXPECT_INVALID(specdec_drafter_begin_iteration(drafter, 1), "drafter");
  EXPECT_INVALID(specdec_drafter_get_stats(drafter, &stats), "drafter");
  CHECK(specdec_context_destroy(ctx) == SPECDEC_OK);
  EXPECT_INVALID(specdec_context_destroy(ctx), "ctx");
  EXPECT_INVALID(specdec_context_backend(ctx, &backend), "ctx");
  CHECK(strstr(specdec_last_error(), "destroyed") != NULL);
}

/* Tree budgets: one request with first children accepted 90% of the time gets a real tree at batch 1 (more
 * drafts than depth), laid out as the tree sampler's parent array. */
static void test_policy_trees(const specdec_cost_model* model) {
  const int64_t contexts[2] = {4096, 4096};
  const double acceptance[2] = {0.9, 0.9};
  int32_t parents[2 * 17];
  int32_t drafts[2] = {-1, -1};
  int32_t depth[17] = {0};
  double goodput = -1;
  int j, deepest = 0;

  CHECK(specdec_choose_draft_trees(model, contexts, acceptance, 1, 1, 16, 6, parents, drafts, &goodput) == SPECDEC_OK);
  CHECK(drafts[0] > 0 && drafts[0] <= 16 && goodput > 0 && parents[0] == -1);
  for (j = 1; j <= 16; j++) {
    if (j <= drafts[0]) {
      CHECK(parents[j] >= 0 && parents[j] < j);
      depth[j] = depth[parents[j]] + 1;
      deepest = depth[j] > deepest ? depth[j] : deepest;
    } else {
      CHECK(parents[j] == -1);
    }
  }
  CHECK(deepest >= 1 && deepest <= 6 && drafts[0] > deepest);

  EXPECT_INVALID(specdec_choose_draft_trees(model, contexts, acceptance, 1, 1, 0, 1, parents, drafts, &goodput),
                 "max_drafts");
  EXPECT_INVALID(specdec_choose_draft_trees(model, contexts, acceptance, 1, 1, SPECDEC_MAX_DRAFTS + 1, 6, parents,
                                            drafts, &goodput),
                 "max_drafts");
  EXPECT_INVALID(specdec_choose_draft_trees(model, contexts, acceptance, 1, 1, 16, 17, parents, drafts, &goodput),
                 "max_depth");
  EXPECT_INVALID(specdec_choose_draft_trees(model, contexts, acceptance, 2, 0, 16, 6, parents, drafts, &goodput),
                 "positions");
  EXPECT_INVALID(specdec_choose_draft_trees(model, contexts, acceptance, 1, 1, 16, 6, NULL, drafts, &goodput),
                 "out_parents");
  EXPECT_INVALID(specdec_choose_draft_trees(model, contexts, acceptance, 1, 1, 16, 6, parents, NULL, &goodput),
                 "out_num_drafts");
  EXPECT_INVALID(specdec_choose_draft_trees(NULL, contexts, acceptance, 1, 1, 16, 6, parents, drafts, &goodput),
                 "model");
}

/* The policy: a preset cost model, step prices, and per-request draft lengths. */
static void test_policy(void) {
  specdec_cost_model model;
  double target = 0, draft = 0, verify = 0, goodput = -1;
  const int64_t contexts[3] = {4096, 4096, 4096};
  /* Requests 0 and 1 have drafts accepted 95% of the time; request 2 only 20%. */
  const double acceptance[3 * 2] = {0.95, 0.95, 0.95, 0.95, 0.2, 0.2};
  const double bad_acceptance[2] = {0.9, 1.5};
  int32_t lengths[3] = {-1, -1, -1};

  CHECK(specdec_cost_model_preset(SPECDEC_GPU_A100, SPECDEC_MODEL_QWEN25_7B, &model) == SPECDEC_OK);
  CHECK(model.layers == 28 && model.vocab == 152064 && model.bandwidth == 2.039e12);
  CHECK(specdec_cost_model_step_seconds(&model, 0, 1, 4096, 0, &target) == SPECDEC_OK);
  CHECK(specdec_cost_model_step_seconds(&model, 1, 1, 4096, 0, &draft) == SPECDEC_OK);
  CHECK(specdec_cost_model_step_seconds(&model, 2, 1, 4096, 6, &verify) == SPECDEC_OK);
  CHECK(target > 0.005 && target < 0.02 && draft > 0.4 * target && draft < 0.6 * target && verify >= target);
  CHECK(specdec_choose_draft_lengths(&model, contexts, acceptance, 3, 2, 8, lengths, &goodput) == SPECDEC_OK);
  CHECK(lengths[0] > 0 && lengths[1] > 0 && lengths[2] < lengths[0] && goodput > 0);

  EXPECT_INVALID(specdec_cost_model_preset(2, SPECDEC_MODEL_QWEN25_7B, &model), "gpu");
  EXPECT_INVALID(specdec_cost_model_preset(SPECDEC_GPU_A100, 5, &model), "model");
  EXPECT_INVALID(specdec_cost_model_preset(SPECDEC_GPU_A100, SPECDEC_MODEL_QWEN25_7B, NULL), "out");
  EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 3, 1, 0, 0, &target), "kind");
  EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 2, 4, 0, 3, &target), "verified_tokens");
  EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 0, -1, 0, 0, &target), "batch");
  EXPECT_INVALID(specdec_cost_model_step_seconds(NULL, 0, 1, 0, 0, &target), "model");
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, bad_acceptance, 1, 2, 8, lengths, &goodput),
                 "acceptance[1]");
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, acceptance, 3, 0, 8, lengths, &goodput), "positions");
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, acceptance, 3, 2, 100, lengths, &goodput), "max_draft");
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, NULL, acceptance, 3, 2, 8, lengths, &goodput), "contexts");
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, acceptance, 3, 2, 8, lengths, NULL), "out_goodput");
  /* Batch sizes past the documented limit are refused before anything is read or allocated (before: 2^40
   * aborted the process on a failed allocation, 2^60 returned SPECDEC_PANIC). */
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, acceptance, (int64_t)1 << 40, 1, 8, lengths, &goodput),
                 "num_requests");
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, acceptance, (int64_t)1 << 60, 1, 8, lengths, &goodput),
                 "num_requests");
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, acceptance, SPECDEC_MAX_POLICY_REQUESTS + 1, 1, 8,
                                              lengths, &goodput),
                 "num_requests");
  {
    int32_t parents[17], drafts[1];
    EXPECT_INVALID(
        specdec_choose_draft_trees(&model, contexts, acceptance, (int64_t)1 << 40, 1, 16, 6, parents, drafts, &goodput),
        "num_requests");
    EXPECT_INVALID(
        specdec_choose_draft_trees(&model, contexts, acceptance, (int64_t)1 << 60, 1, 16, 6, parents, drafts, &goodput),
        "num_requests");
  }
  test_policy_trees(&model);
  model.bandwidth_efficiency = 0.0;
  EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 0, 1, 0, 0, &target), "bandwidth_efficiency");
  CHECK(specdec_cost_model_preset(SPECDEC_GPU_H100, SPECDEC_MODEL_LLAMA3_8B, &model) == SPECDEC_OK);
  model.t0 = -1.0;
  EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 0, 1, 0, 0, &target), "t0");
  /* Every field valid alone, but the step time overflows: an invalid model, and the output untouched. */
  CHECK(specdec_cost_model_preset(SPECDEC_GPU_H100, SPECDEC_MODEL_LLAMA3_8B, &model) == SPECDEC_OK);
  model.bandwidth = 5e-324;
  target = -7.0;
  EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 0, 1, 4096, 0, &target), "model");
  CHECK(target == -7.0);
  /* The policy refuses such a model too, rather than answering a goodput of 0 (found by tests/fuzz_capi.rs). */
  goodput = -7.0;
  EXPECT_INVALID(specdec_choose_draft_lengths(&model, contexts, acceptance, 3, 2, 8, lengths, &goodput), "model");
  CHECK(goodput == -7.0);
  /* Contexts are bounded so that a batch's total cannot overflow (before: SPECDEC_PANIC on an integer overflow). */
  CHECK(specdec_cost_model_preset(SPECDEC_GPU_A100, SPECDEC_MODEL_QWEN25_7B, &model) == SPECDEC_OK);
  {
    const int64_t huge_contexts[3] = {INT64_MAX, 2, INT64_MAX};
    EXPECT_INVALID(specdec_choose_draft_lengths(&model, huge_contexts, acceptance, 3, 2, 8, lengths, &goodput),
                   "contexts[0]");
    EXPECT_INVALID(specdec_cost_model_step_seconds(&model, 0, 1, SPECDEC_MAX_CONTEXT_TOKENS + 1, 0, &target),
                   "context_tokens");
  }
}

/* Rejection sampling with certain outcomes: one-hot rows make every coin and race decided. */
static void test_rejection_chain_and_tree(specdec_context* ctx) {
  const uint64_t seeds[2] = {7, 8}, steps[2] = {0, 1};
  const int32_t offsets[3] = {0, 2, 2}, drafts[2] = {2, 1};
  /* Target rows of request 0 (one-hot on 2, 1, then bonus 3) and request 1 (one-hot on 0). */
  float probs[4 * 4] = {0};
  float draft_probs[2 * 4] = {0};
  int32_t accepted[2], emitted[6], nodes[6];
  int8_t flags[6];
  specdec_sampling sampling = {NULL, NULL, NULL, seeds, steps, NULL, NULL, NULL};
  specdec_verify_outputs out = {accepted, emitted, nodes, flags, NULL};
  probs[0 * 4 + 2] = 1;
  probs[1 * 4 + 1] = 1;
  probs[2 * 4 + 3] = 1;
  probs[3 * 4 + 0] = 1;
  draft_probs[0 * 4 + 2] = 1;
  draft_probs[1 * 4 + 1] = 1;
  CHECK(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, draft_probs, 4, offsets, 2, drafts, 2,
                                       &sampling, 3, &out, NULL) == SPECDEC_OK);
  CHECK(accepted[0] == 2 && emitted[0] == 2 && emitted[1] == 1 && emitted[2] == 3);
  CHECK(nodes[0] == 1 && nodes[1] == 2 && nodes[2] == -1 && flags[0] == 1 && flags[1] == 1 && flags[2] == -1);
  CHECK(accepted[1] == 0 && emitted[3] == 0 && emitted[4] == -1 && nodes[3] == -1 && flags[3] == -1);
  /* Point-mass drafts (no draft rows), optional outputs skipped. */
  out.accepted_nodes = NULL;
  out.accept_flags = NULL;
  CHECK(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, NULL, 4, offsets, 2, drafts, 2, &sampling, 3,
                                       &out, NULL) == SPECDEC_OK);
  CHECK(accepted[0] == 2 && emitted[2] == 3 && accepted[1] == 0 && emitted[3] == 0);

  {
    /* bf16 logits at temperature 0 are greedy verification: the greedy test's rows give its result. */
    uint16_t logits[16];
    const float temperature[2] = {0, 0};
    int r, c;
    for (r = 0; r < 4; ++r) {
      for (c = 0; c < 4; ++c) logits[r * 4 + c] = bf16_of(kLogits[r][c]);
    }
    sampling.temperature = temperature;
    CHECK(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_BF16, logits, NULL, 4, kOffsets, 2, kDrafts, 2,
                                         &sampling, 3, &out, NULL) == SPECDEC_OK);
    check_greedy_result(accepted, emitted);
    sampling.temperature = NULL;
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_BF16, logits, NULL, 4, kOffsets, 2, kDrafts,
                                                  2, &sampling, 3, &out, NULL),
                   "sampling.temperature");
  }

  {
    /* A root with children 1 and 2 (tokens 1, 2); the root's row is one-hot on 2, node 2's on 0. */
    const int32_t node_offsets[2] = {0, 3}, tokens[3] = {-1, 1, 2}, parents[3] = {-1, 0, 0};
    int32_t bad_parents[3] = {-1, 1, 0};
    float tree_probs[3 * 4] = {0};
    tree_probs[0 * 4 + 2] = 1;
    tree_probs[1 * 4 + 3] = 1;
    tree_probs[2 * 4 + 0] = 1;
    out.accepted_nodes = nodes;
    CHECK(specdec_rejection_verify_tree(ctx, SPECDEC_ROWS_PROBS_F32, tree_probs, NULL, 4, node_offsets, 1, tokens,
                                        parents, 3, &sampling, 2, &out, NULL) == SPECDEC_OK);
    CHECK(accepted[0] == 1 && emitted[0] == 2 && emitted[1] == 0 && nodes[0] == 2 && nodes[1] == -1);
    EXPECT_INVALID(specdec_rejection_verify_tree(ctx, SPECDEC_ROWS_PROBS_F32, tree_probs, NULL, 4, node_offsets, 1,
                                                 tokens, bad_parents, 3, &sampling, 2, &out, NULL),
                   "parents[1]");
  }

  {
    /* Probabilities refuse each sampling parameter by its own name (before: all blamed on temperature); an
       empty batch of logits takes a null temperature, as every empty array may be null. */
    const int32_t top_k[2] = {2, 2}, no_offsets[1] = {0};
    const float top_p[2] = {0.9f, 0.9f};
    sampling.top_k = top_k;
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, NULL, 4, offsets, 2, drafts, 2,
                                                  &sampling, 3, &out, NULL),
                   "sampling.top_k");
    sampling.top_k = NULL;
    sampling.top_p = top_p;
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, NULL, 4, offsets, 2, drafts, 2,
                                                  &sampling, 3, &out, NULL),
                   "sampling.top_p");
    sampling.top_p = NULL;
    CHECK(sampling.temperature == NULL);
    CHECK(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_BF16, NULL, NULL, 4, no_offsets, 0, NULL, 0,
                                         &sampling, 3, &out, NULL) == SPECDEC_OK);
  }

  {
    /* The drafter's own parameters: logits with draft rows only, top-k and top-p only with a temperature; a
       drafted token of draft probability 0 cannot have been drawn, so it is an error, never accepted. */
    const float one[2] = {1, 1};
    const int32_t top_k[2] = {2, 2};
    float logits[4 * 4] = {0}, draft_logits[2 * 4] = {0};
    sampling.temperature = one;
    sampling.draft_temperature = one;
    CHECK(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_F32, logits, draft_logits, 4, offsets, 2, drafts, 2,
                                         &sampling, 3, &out, NULL) == SPECDEC_OK);
    draft_logits[0 * 4 + 2] = -INFINITY; /* request 0's first draft is token 2 */
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_F32, logits, draft_logits, 4, offsets, 2,
                                                  drafts, 2, &sampling, 3, &out, NULL),
                   "draft_tokens[0]");
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_F32, logits, NULL, 4, offsets, 2, drafts, 2,
                                                  &sampling, 3, &out, NULL),
                   "sampling.draft_temperature");
    sampling.draft_temperature = NULL;
    sampling.draft_top_k = top_k;
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_F32, logits, draft_logits, 4, offsets, 2,
                                                  drafts, 2, &sampling, 3, &out, NULL),
                   "sampling.draft_top_k");
    sampling.draft_top_k = NULL;
    sampling.temperature = NULL;
  }

  {
    /* Seeds and steps are required, and their absence says what to pass; specdec_sample_seed derives distinct
       seeds for the samples of one prompt. */
    const uint64_t* given_steps = sampling.steps;
    sampling.steps = NULL;
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, NULL, 4, offsets, 2, drafts, 2,
                                                  &sampling, 3, &out, NULL),
                   "sampling.steps");
    CHECK(strstr(specdec_last_error(), "step counter") != NULL);
    sampling.steps = given_steps;
    CHECK(specdec_sample_seed(42, 0) != specdec_sample_seed(42, 1));
    CHECK(specdec_sample_seed(42, 0) != specdec_sample_seed(43, 0));
  }
  EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, NULL, 4, offsets, 2, drafts, 2,
                                                NULL, 3, &out, NULL),
                 "sampling");
  EXPECT_INVALID(
      specdec_rejection_verify_chain(ctx, 7, probs, NULL, 4, offsets, 2, drafts, 2, &sampling, 3, &out, NULL),
      "rows_kind");
  EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, NULL, 4, offsets, 2, drafts, 2,
                                                &sampling, 2, &out, NULL),
                 "emit_width");
  {
    const int32_t padded[2] = {-1, 1};
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_PROBS_F32, probs, NULL, 4, offsets, 2, padded, 2,
                                                  &sampling, 3, &out, NULL),
                   "draft_tokens[0]");
  }
  {
    const float negative[2] = {-1, 1};
    float logits[16] = {0};
    sampling.temperature = negative;
    EXPECT_INVALID(specdec_rejection_verify_chain(ctx, SPECDEC_ROWS_LOGITS_F32, logits, NULL, 4, offsets, 2, drafts, 2,
                                                  &sampling, 3, &out, NULL),
                   "temperature[0]");
    sampling.temperature = NULL;
  }
}

/* The int4 format's rule for where the code of W[row, col] lives (docs/int4-format.md), written out in C. */
static uint32_t int4_code(const uint32_t* packed, int64_t k, int64_t row, int64_t col) {
  int64_t tile = (row / 16) * (k / 64) + col / 64;
  int64_t r = row % 16, within = col % 32, half = (col % 64) / 32;
  int64_t lane = 4 * (r % 8) + within / 8, word = 2 * half + (within % 8) / 4, d = within % 4;
  int64_t nibble = 4 * (d % 2) + 2 * (d / 2) + r / 8;
  return (packed[tile * 128 + lane * 4 + word] >> (4 * nibble)) & 0xFu;
}

static float bf16_to_float(uint16_t bits) {
  uint32_t wide = (uint32_t)bits << 16;
  float x;
  memcpy(&x, &wide, 4);
  return x;
}

/* The one tree vocabulary: a drafter's proposal becomes a verification tree under its root, and the sampler's
   accepted paths become compaction's, root first. */
static void test_tree_converters(void) {
  const int32_t draft_tokens[3] = {7, 8, 9}, draft_parents[3] = {-1, -1, 0};
  int32_t tokens[4], parents[4];
  int64_t width = 0;
  CHECK(SPECDEC_MAX_TREE_NODES == 64 && SPECDEC_MAX_DRAFTS == 63);
  CHECK(specdec_draft_to_verify_tree(42, draft_tokens, draft_parents, 3, tokens, parents, &width) == SPECDEC_OK);
  CHECK(tokens[0] == 42 && tokens[1] == 7 && tokens[2] == 8 && tokens[3] == 9);
  CHECK(parents[0] == -1 && parents[1] == 0 && parents[2] == 0 && parents[3] == 1 && width == 3);
  CHECK(specdec_draft_to_verify_tree(42, NULL, NULL, 0, tokens, parents, &width) == SPECDEC_OK);
  CHECK(tokens[0] == 42 && parents[0] == -1 && width == 1);
  {
    const int32_t bad_parents[3] = {-1, 1, 0}, bad_tokens[3] = {7, -8, 9};
    EXPECT_INVALID(specdec_draft_to_verify_tree(42, draft_tokens, bad_parents, 3, tokens, parents, &width),
                   "draft_parents[1]");
    EXPECT_INVALID(specdec_draft_to_verify_tree(42, bad_tokens, draft_parents, 3, tokens, parents, &width),
                   "draft_tokens[1]");
    EXPECT_INVALID(
        specdec_draft_to_verify_tree(42, draft_tokens, draft_parents, SPECDEC_MAX_DRAFTS + 1, tokens, parents, &width),
        "num_drafts");
  }
  {
    /* Request 0 accepted nodes 2 and 5, request 1 nothing (emit_width 3). */
    const int32_t counts[2] = {2, 0}, accepted[6] = {2, 5, -1, -1, -1, -1}, flagged[1] = {-1};
    int32_t offsets[3], nodes[6];
    CHECK(specdec_compaction_paths(counts, accepted, 2, 3, offsets, nodes) == SPECDEC_OK);
    CHECK(offsets[0] == 0 && offsets[1] == 3 && offsets[2] == 4);
    CHECK(nodes[0] == 0 && nodes[1] == 2 && nodes[2] == 5 && nodes[3] == 0);
    EXPECT_INVALID(specdec_compaction_paths(flagged, accepted, 1, 3, offsets, nodes), "accepted_counts[0]");
  }
}

static void test_int4(specdec_context* ctx) {
  enum { N = 32, K = 128, G = 32, GROUPS = K / G };
  static uint16_t w[N * K], scales[GROUPS * N], scales2[GROUPS * N], x[2 * K], y[2 * N];
  static uint32_t packed[N * K / 8], packed2[N * K / 8];
  static uint8_t zeros[GROUPS * N], zeros2[GROUPS * N];
  static int32_t qweight[K / 8 * N], qzeros[GROUPS * N / 8], g_idx[K];
  int64_t row, col, i;
  int bad = 0;
  for (row = 0; row < N; ++row)
    for (col = 0; col < K; ++col) w[row * K + col] = bf16_of((float)((row * 7 + col * 3) % 31 - 15) / 16.0f);
  CHECK(specdec_int4_quantize(ctx, w, SPECDEC_DTYPE_BF16, N, K, G, packed, scales, SPECDEC_DTYPE_BF16, zeros, NULL) ==
        SPECDEC_OK);
  /* Every weight within s / 2 (plus the scale's rounding) of its dequantized value, read by the rule above. */
  for (row = 0; row < N; ++row) {
    for (col = 0; col < K; ++col) {
      int64_t meta = (col / G) * N + row;
      float s = bf16_to_float(scales[meta]);
      float deq = ((float)int4_code(packed, K, row, col) - (float)zeros[meta]) * s;
      float err = bf16_to_float(w[row * K + col]) - deq;
      if (err < 0) err = -err;
      if (!(err <= 0.56f * s)) ++bad;
    }
  }
  CHECK(bad == 0);
  /* Packing with the quantizer's own scales and zeros reproduces its codes. */
  CHECK(specdec_int4_pack(ctx, w, SPECDEC_DTYPE_BF16, N, K, G, scales, SPECDEC_DTYPE_BF16, zeros, packed2, NULL) ==
        SPECDEC_OK);
  CHECK(memcmp(packed, packed2, sizeof packed) == 0);
  /* GEMV, two activation rows, against a double sum of the dequantized weights. */
  for (i = 0; i < K; ++i) {
    x[i] = bf16_of(1.0f);
    x[K + i] = bf16_of(i % 2 ? -0.5f : 0.25f);
  }
  CHECK(specdec_int4_gemv(ctx, packed, scales, SPECDEC_DTYPE_BF16, zeros, N, K, G, x, SPECDEC_DTYPE_BF16, 2, y, NULL) ==
        SPECDEC_OK);
  bad = 0;
  for (i = 0; i < 2; ++i) {
    for (row = 0; row < N; ++row) {
      double sum = 0, mag = 0;
      for (col = 0; col < K; ++col) {
        int64_t meta = (col / G) * N + row;
        double deq = ((double)int4_code(packed, K, row, col) - zeros[meta]) * bf16_to_float(scales[meta]);
        double t = deq * bf16_to_float(x[i * K + col]);
        sum += t;
        mag += t < 0 ? -t : t;
      }
      double got = bf16_to_float(y[i * N + row]), err = got - sum;
      if (err < 0) err = -err;
      if (!(err <= (sum < 0 ? -sum : sum) / 256.0 + mag * 1e-6)) ++bad;
    }
  }
  CHECK(bad == 0);
  /* A GPTQ checkpoint (AutoGPTQ layout, zeros stored minus one) of the same codes converts back to them. */
  memset(qweight, 0, sizeof qweight);
  memset(qzeros, 0, sizeof qzeros);
  for (row = 0; row < N; ++row)
    for (col = 0; col < K; ++col)
      qweight[(col / 8) * N + row] |= (int32_t)(int4_code(packed, K, row, col) << (4 * (col % 8)));
  for (i = 0; i < GROUPS * N; ++i)
    qzeros[(i / N) * (N / 8) + (i % N) / 8] |= (int32_t)((uint32_t)((zeros[i] + 15) & 0xF) << (4 * (i % N % 8)));
  for (i = 0; i < K; ++i) g_idx[i] = (int32_t)(i / G);
  CHECK(specdec_int4_from_gptq(N, K, G, qweight, qzeros, scales, SPECDEC_DTYPE_BF16, g_idx, 1, packed2, scales2,
                               zeros2) == SPECDEC_OK);
  CHECK(memcmp(packed, packed2, sizeof packed) == 0 && memcmp(zeros, zeros2, sizeof zeros) == 0 &&
        memcmp(scales, scales2, sizeof scales) == 0);
  g_idx[5] = 3; /* act-order */
  EXPECT_INVALID(
      specdec_int4_from_gptq(N, K, G, qweight, qzeros, scales, SPECDEC_DTYPE_BF16, g_idx, 1, packed2, scales2, zeros2),
      "g_idx[5]");
  EXPECT_INVALID(
      specdec_int4_from_gptq(N, K, G, qweight, qzeros, scales, SPECDEC_DTYPE_BF16, NULL, 2, packed2, scales2, zeros2),
      "zeros_minus_one");
  EXPECT_INVALID(specdec_int4_from_awq(N, K, G, NULL, qzeros, scales, SPECDEC_DTYPE_BF16, packed2, scales2, zeros2),
                 "qweight");
  /* Shapes and dtypes outside the format. */
  EXPECT_INVALID(
      specdec_int4_quantize(ctx, w, SPECDEC_DTYPE_BF16, 24, K, G, packed, scales, SPECDEC_DTYPE_BF16, zeros, NULL),
      "`n`");
  EXPECT_INVALID(
      specdec_int4_quantize(ctx, w, SPECDEC_DTYPE_BF16, N, K, 48, packed, scales, SPECDEC_DTYPE_BF16, zeros, NULL),
      "group_size");
  EXPECT_INVALID(
      specdec_int4_quantize(ctx, w, SPECDEC_DTYPE_F32, N, K, G, packed, scales, SPECDEC_DTYPE_BF16, zeros, NULL),
      "weights_dtype");
  EXPECT_INVALID(
      specdec_int4_gemv(ctx, packed, scales, SPECDEC_DTYPE_BF16, zeros, N, K, G, x, SPECDEC_DTYPE_BF16, 17, y, NULL),
      "`m`");
  EXPECT_INVALID(
      specdec_int4_gemv(ctx, NULL, scales, SPECDEC_DTYPE_BF16, zeros, N, K, G, x, SPECDEC_DTYPE_BF16, 2, y, NULL),
      "packed");
  zeros2[3] = 16;
  EXPECT_INVALID(
      specdec_int4_pack(ctx, w, SPECDEC_DTYPE_BF16, N, K, G, scales, SPECDEC_DTYPE_BF16, zeros2, packed2, NULL),
      "zeros[3]");
}

/* Tree attention: a 2-node chain with no prefix. Node 0 sees only itself, so its output is its own value; node 1
 * sees both, with softmax weights from the scores computed here. Then compaction of the path [1] moves slot 1 to
 * slot 0, and bad parents and page-table entries are named. bf16, GQA 2:1, head_dim 64, one page of 16. */
static float f32_of_bf16(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

static void test_tree_attention(specdec_context* ctx) {
  enum { D = 64, HQ = 2, HKV = 1, N = 2, PAGES = 2, PS = 16 };
  uint16_t q[N * HQ * D], k[N * HKV * D], v[N * HKV * D], out[N * HQ * D];
  static uint16_t k_cache[PAGES * PS * HKV * D], v_cache[PAGES * PS * HKV * D];
  float lse[N * HQ];
  int32_t offsets[2] = {0, N}, parents[N] = {-1, 0}, prefix[1] = {0}, table[1] = {1}, status[1] = {-9};
  for (int i = 0; i < N * HQ * D; ++i) q[i] = bf16_of((float)((i * 7) % 5 - 2) * 0.25f);
  for (int i = 0; i < N * HKV * D; ++i) {
    k[i] = bf16_of((float)((i * 3) % 7 - 3) * 0.125f);
    v[i] = bf16_of((float)(i % 9 - 4) * 0.5f);
  }
  const float scale = 0.125f;
  CHECK(specdec_tree_attention(ctx, SPECDEC_DTYPE_BF16, q, k, v, 1, N, HQ, 4, offsets, parents, prefix, table, k_cache,
                               v_cache, PAGES, PS, HKV, D, 1, NULL, 0, 0, scale, out, lse, status, NULL) == SPECDEC_OK);
  CHECK(status[0] == 0);
  for (int h = 0; h < HQ; ++h) {
    for (int d = 0; d < D; ++d) CHECK(out[h * D + d] == v[d]); /* node 0: its own value, exactly */
    double s[2];
    for (int j = 0; j < 2; ++j) {
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += (double)f32_of_bf16(q[(HQ + h) * D + d]) * f32_of_bf16(k[j * D + d]);
      s[j] = dot * scale;
    }
    double m = s[0] > s[1] ? s[0] : s[1], w0 = exp(s[0] - m), w1 = exp(s[1] - m);
    for (int d = 0; d < D; ++d) {
      double want = (w0 * f32_of_bf16(v[d]) + w1 * f32_of_bf16(v[D + d])) / (w0 + w1);
      CHECK(fabs(f32_of_bf16(out[(HQ + h) * D + d]) - want) <= fabs(want) / 128 + 1e-6);
    }
    CHECK(fabs(lse[HQ + h] - (m + log(w0 + w1))) <= 1e-5 * (1 + fabs(lse[HQ + h])));
  }
  /* The nodes were appended to page 1 (the table's only entry), slots 0 and 1. */
  CHECK(memcmp(&k_cache[PS * D], k, sizeof k) == 0 && memcmp(&v_cache[PS * D], v, sizeof v) == 0);

  void *k_layers[1] = {k_cache}, *v_layers[1] = {v_cache};
  int32_t acc_offsets[2] = {0, 1}, acc_nodes[1] = {1};
  CHECK(specdec_tree_kv_compact(ctx, k_layers, v_layers, 1, PAGES, PS, HKV, D, 1, 1, acc_offsets, acc_nodes, 1, prefix,
                                table, NULL, NULL) == SPECDEC_OK);
  CHECK(memcmp(&k_cache[PS * D], &k[D], D * 2) == 0 && memcmp(&v_cache[PS * D], &v[D], D * 2) == 0);

  int32_t bad_parents[N] = {-1, 1}, bad_table[1] = {PAGES};
  EXPECT_INVALID(
      specdec_tree_attention(ctx, SPECDEC_DTYPE_BF16, q, k, v, 1, N, HQ, 4, offsets, bad_parents, prefix, table,
                             k_cache, v_cache, PAGES, PS, HKV, D, 1, NULL, 0, 0, scale, out, NULL, NULL, NULL),
      "parents[1]");
  EXPECT_INVALID(
      specdec_tree_attention(ctx, SPECDEC_DTYPE_BF16, q, k, v, 1, N, HQ, 4, offsets, parents, prefix, bad_table,
                             k_cache, v_cache, PAGES, PS, HKV, D, 1, NULL, 0, 0, scale, out, NULL, NULL, NULL),
      "page_table[0]");
  EXPECT_INVALID(
      specdec_tree_attention(ctx, SPECDEC_DTYPE_F32, q, k, v, 1, N, HQ, 4, offsets, parents, prefix, table, k_cache,
                             v_cache, PAGES, PS, HKV, D, 1, NULL, 0, 0, scale, out, NULL, NULL, NULL),
      "dtype");
  EXPECT_INVALID(
      specdec_tree_attention(ctx, SPECDEC_DTYPE_BF16, q, k, v, 1, N, HQ, 65, offsets, parents, prefix, table, k_cache,
                             v_cache, PAGES, PS, HKV, D, 1, NULL, 0, 0, scale, out, NULL, NULL, NULL),
      "max_tree_size");
}

/*
 * Device pointers. The driver is opened with dlopen (the test does not link libcuda), and the few calls the test
 * needs to make memory and a stream are looked up by their versioned names.
 */
typedef int cu_status;
typedef unsigned long long cu_ptr;
static struct {
  void* lib;
  cu_status (*ctx_retain)(void**, int);
  cu_status (*ctx_release)(int);
  cu_status (*ctx_push)(void*);
  cu_status (*ctx_pop)(void**);
  cu_status (*alloc)(cu_ptr*, size_t);
  cu_status (*free)(cu_ptr);
  cu_status (*htod)(cu_ptr, const void*, size_t);
  cu_status (*dtoh)(void*, cu_ptr, size_t);
  cu_status (*stream_create)(void**, unsigned);
  cu_status (*stream_destroy)(void*);
  cu_status (*stream_sync)(void*);
} cu;

static int load_symbol(void* out, const char* name) {
  void* symbol = dlsym(cu.lib, name);
  memcpy(out, &symbol, sizeof symbol); /* object to function pointer, without a cast ISO C forbids */
  return symbol != NULL;
}

static int open_driver(void) {
  cu.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  return cu.lib != NULL && load_symbol(&cu.ctx_retain, "cuDevicePrimaryCtxRetain") &&
         load_symbol(&cu.ctx_release, "cuDevicePrimaryCtxRelease_v2") &&
         load_symbol(&cu.ctx_push, "cuCtxPushCurrent_v2") && load_symbol(&cu.ctx_pop, "cuCtxPopCurrent_v2") &&
         load_symbol(&cu.alloc, "cuMemAlloc_v2") && load_symbol(&cu.free, "cuMemFree_v2") &&
         load_symbol(&cu.htod, "cuMemcpyHtoD_v2") && load_symbol(&cu.dtoh, "cuMemcpyDtoH_v2") &&
         load_symbol(&cu.stream_create, "cuStreamCreate") && load_symbol(&cu.stream_destroy, "cuStreamDestroy_v2") &&
         load_symbol(&cu.stream_sync, "cuStreamSynchronize");
}

/* A device copy of `bytes` bytes of `host` (at least one byte is allocated, so empty arrays get a valid pointer). */
static void* to_device(const void* host, size_t bytes) {
  cu_ptr p = 0;
  CHECK(cu.alloc(&p, bytes > 0 ? bytes : 1) == 0);
  if (host != NULL && bytes > 0) CHECK(cu.htod(p, host, bytes) == 0);
  return (void*)(uintptr_t)p;
}

/* A device array of `bytes` bytes, every byte 0xAB: what the kernel writes must overwrite it. */
static void* poisoned(size_t bytes) {
  unsigned char* fill = (unsigned char*)malloc(bytes > 0 ? bytes : 1);
  void* p;
  memset(fill, 0xAB, bytes > 0 ? bytes : 1);
  p = to_device(fill, bytes);
  free(fill);
  return p;
}

static void to_host(void* host, const void* device, size_t bytes) {
  CHECK(cu.dtoh(host, (cu_ptr)(uintptr_t)device, bytes) == 0);
}

static void release(void* device) { CHECK(cu.free((cu_ptr)(uintptr_t)device) == 0); }

static void test_device_greedy(specdec_context* gpu, void* stream) {
  float logits_f32[16];
  uint16_t logits_f16[16], logits_bf16[16];
  const void* inputs[3] = {logits_f32, logits_f16, logits_bf16};
  const size_t sizes[3] = {sizeof logits_f32, sizeof logits_f16, sizeof logits_bf16};
  const int32_t dtypes[3] = {SPECDEC_DTYPE_F32, SPECDEC_DTYPE_F16, SPECDEC_DTYPE_BF16};
  void *offsets = to_device(kOffsets, sizeof kOffsets), *drafts = to_device(kDrafts, sizeof kDrafts);
  int i, d;
  for (i = 0; i < 16; ++i) {
    logits_f32[i] = kLogits[i / 4][i % 4];
    logits_bf16[i] = bf16_of(logits_f32[i]);
    logits_f16[i] = f16_of_small_int((int)logits_f32[i]);
  }
  for (d = 0; d < 3; ++d) {
    int32_t accepted[2], emitted[6];
    void* logits = to_device(inputs[d], sizes[d]);
    void *accepted_d = poisoned(sizeof accepted), *emitted_d = poisoned(sizeof emitted);
    CHECK(specdec_greedy_verify(gpu, logits, dtypes[d], 4, (const int32_t*)offsets, 2, (const int32_t*)drafts, 2, 3,
                                (int32_t*)accepted_d, (int32_t*)emitted_d, NULL, stream) == SPECDEC_OK);
    CHECK(cu.stream_sync(stream) == 0);
    to_host(accepted, accepted_d, sizeof accepted);
    to_host(emitted, emitted_d, sizeof emitted);
    check_greedy_result(accepted, emitted);
    /* A logits pointer that is not aligned for its dtype is named, on the device as on the host. */
    EXPECT_INVALID(
        specdec_greedy_verify(gpu, (const char*)logits + 1, dtypes[d], 4, (const int32_t*)offsets, 2,
                              (const int32_t*)drafts, 2, 3, (int32_t*)accepted_d, (int32_t*)emitted_d, NULL, stream),
        "logits");
    release(logits);
    release(accepted_d);
    release(emitted_d);
  }
  release(offsets);
  release(drafts);
}

/* The CPU test's chain (draft rows and point masses) and tree, on device pointers: the same hand-worked outcome. */
static void test_device_rejection(specdec_context* gpu, void* stream) {
  const uint64_t seeds[2] = {7, 8}, steps[2] = {0, 1};
  const int32_t offsets[3] = {0, 2, 2}, drafts[2] = {2, 1};
  float probs[4 * 4] = {0}, draft_probs[2 * 4] = {0};
  int32_t accepted[2], emitted[6], nodes[6];
  int8_t flags[6];
  void *seeds_d = to_device(seeds, sizeof seeds), *steps_d = to_device(steps, sizeof steps);
  void *offsets_d = to_device(offsets, sizeof offsets), *drafts_d = to_device(drafts, sizeof drafts);
  void *accepted_d = poisoned(sizeof accepted), *emitted_d = poisoned(sizeof emitted);
  void *nodes_d = poisoned(sizeof nodes), *flags_d = poisoned(sizeof flags);
  void *probs_d, *draft_probs_d;
  specdec_sampling sampling = {NULL, NULL, NULL, (const uint64_t*)seeds_d, (const uint64_t*)steps_d, NULL, NULL, NULL};
  specdec_verify_outputs out = {(int32_t*)accepted_d, (int32_t*)emitted_d, (int32_t*)nodes_d, (int8_t*)flags_d, NULL};
  probs[0 * 4 + 2] = 1;
  probs[1 * 4 + 1] = 1;
  probs[2 * 4 + 3] = 1;
  probs[3 * 4 + 0] = 1;
  draft_probs[0 * 4 + 2] = 1;
  draft_probs[1 * 4 + 1] = 1;
  probs_d = to_device(probs, sizeof probs);
  draft_probs_d = to_device(draft_probs, sizeof draft_probs);
  CHECK(specdec_rejection_verify_chain(gpu, SPECDEC_ROWS_PROBS_F32, probs_d, draft_probs_d, 4,
                                       (const int32_t*)offsets_d, 2, (const int32_t*)drafts_d, 2, &sampling, 3, &out,
                                       stream) == SPECDEC_OK);
  CHECK(cu.stream_sync(stream) == 0);
  to_host(accepted, accepted_d, sizeof accepted);
  to_host(emitted, emitted_d, sizeof emitted);
  to_host(nodes, nodes_d, sizeof nodes);
  to_host(flags, flags_d, sizeof flags);
  CHECK(accepted[0] == 2 && emitted[0] == 2 && emitted[1] == 1 && emitted[2] == 3);
  CHECK(nodes[0] == 1 && nodes[1] == 2 && nodes[2] == -1 && flags[0] == 1 && flags[1] == 1 && flags[2] == -1);
  CHECK(accepted[1] == 0 && emitted[3] == 0 && emitted[4] == -1 && nodes[3] == -1 && flags[3] == -1);
  out.accepted_nodes = NULL;
  out.accept_flags = NULL;
  CHECK(specdec_rejection_verify_chain(gpu, SPECDEC_ROWS_PROBS_F32, probs_d, NULL, 4, (const int32_t*)offsets_d, 2,
                                       (const int32_t*)drafts_d, 2, &sampling, 3, &out, stream) == SPECDEC_OK);
  CHECK(cu.stream_sync(stream) == 0);
  to_host(accepted, accepted_d, sizeof accepted);
  to_host(emitted, emitted_d, sizeof emitted);
  CHECK(accepted[0] == 2 && emitted[2] == 3 && accepted[1] == 0 && emitted[3] == 0);
  {
    const int32_t node_offsets[2] = {0, 3}, tokens[3] = {-1, 1, 2}, parents[3] = {-1, 0, 0};
    float tree_probs[3 * 4] = {0};
    void *node_offsets_d = to_device(node_offsets, sizeof node_offsets), *tokens_d = to_device(tokens, sizeof tokens);
    void *parents_d = to_device(parents, sizeof parents), *tree_probs_d;
    tree_probs[0 * 4 + 2] = 1;
    tree_probs[1 * 4 + 3] = 1;
    tree_probs[2 * 4 + 0] = 1;
    tree_probs_d = to_device(tree_probs, sizeof tree_probs);
    out.accepted_nodes = (int32_t*)nodes_d;
    CHECK(specdec_rejection_verify_tree(gpu, SPECDEC_ROWS_PROBS_F32, tree_probs_d, NULL, 4,
                                        (const int32_t*)node_offsets_d, 1, (const int32_t*)tokens_d,
                                        (const int32_t*)parents_d, 3, &sampling, 2, &out, stream) == SPECDEC_OK);
    CHECK(cu.stream_sync(stream) == 0);
    to_host(accepted, accepted_d, sizeof accepted[0]);
    to_host(emitted, emitted_d, 2 * sizeof emitted[0]);
    to_host(nodes, nodes_d, 2 * sizeof nodes[0]);
    CHECK(accepted[0] == 1 && emitted[0] == 2 && emitted[1] == 0 && nodes[0] == 2 && nodes[1] == -1);
    release(node_offsets_d);
    release(tokens_d);
    release(parents_d);
    release(tree_probs_d);
  }
  release(seeds_d);
  release(steps_d);
  release(offsets_d);
  release(drafts_d);
  release(accepted_d);
  release(emitted_d);
  release(nodes_d);
  release(flags_d);
  release(probs_d);
  release(draft_probs_d);
}

/* Quantize, pack and GEMV on the device: the same bytes as the CPU backend, and y within the GEMV's rounding. */
static void test_device_int4(specdec_context* cpu, specdec_context* gpu, void* stream) {
  enum { N = 32, K = 128, G = 32, GROUPS = K / G };
  static uint16_t w[N * K], scales[GROUPS * N], scales_gpu[GROUPS * N], x[2 * K], y[2 * N], y_gpu[2 * N];
  static uint32_t packed[N * K / 8], packed_gpu[N * K / 8];
  static uint8_t zeros[GROUPS * N], zeros_gpu[GROUPS * N];
  void *w_d, *packed_d = poisoned(sizeof packed), *scales_d = poisoned(sizeof scales),
             *zeros_d = poisoned(sizeof zeros);
  void *x_d, *y_d = poisoned(sizeof y);
  int64_t row, col, i;
  int bad = 0;
  for (row = 0; row < N; ++row)
    for (col = 0; col < K; ++col) w[row * K + col] = bf16_of((float)((row * 5 + col * 11) % 29 - 14) / 8.0f);
  for (i = 0; i < 2 * K; ++i) x[i] = bf16_of((float)(i % 7 - 3) * 0.5f);
  w_d = to_device(w, sizeof w);
  x_d = to_device(x, sizeof x);
  CHECK(specdec_int4_quantize(cpu, w, SPECDEC_DTYPE_BF16, N, K, G, packed, scales, SPECDEC_DTYPE_BF16, zeros, NULL) ==
        SPECDEC_OK);
  CHECK(specdec_int4_quantize(gpu, w_d, SPECDEC_DTYPE_BF16, N, K, G, (uint32_t*)packed_d, scales_d, SPECDEC_DTYPE_BF16,
                              (uint8_t*)zeros_d, stream) == SPECDEC_OK);
  CHECK(cu.stream_sync(stream) == 0);
  to_host(packed_gpu, packed_d, sizeof packed_gpu);
  to_host(scales_gpu, scales_d, sizeof scales_gpu);
  to_host(zeros_gpu, zeros_d, sizeof zeros_gpu);
  CHECK(memcmp(packed, packed_gpu, sizeof packed) == 0);
  CHECK(memcmp(scales, scales_gpu, sizeof scales) == 0);
  CHECK(memcmp(zeros, zeros_gpu, sizeof zeros) == 0);
  CHECK(specdec_int4_pack(gpu, w_d, SPECDEC_DTYPE_BF16, N, K, G, scales_d, SPECDEC_DTYPE_BF16, (const uint8_t*)zeros_d,
                          (uint32_t*)packed_d, stream) == SPECDEC_OK);
  CHECK(cu.stream_sync(stream) == 0);
  to_host(packed_gpu, packed_d, sizeof packed_gpu);
  CHECK(memcmp(packed, packed_gpu, sizeof packed) == 0);
  CHECK(specdec_int4_gemv(cpu, packed, scales, SPECDEC_DTYPE_BF16, zeros, N, K, G, x, SPECDEC_DTYPE_BF16, 2, y, NULL) ==
        SPECDEC_OK);
  CHECK(specdec_int4_gemv(gpu, (const uint32_t*)packed_d, scales_d, SPECDEC_DTYPE_BF16, (const uint8_t*)zeros_d, N, K,
                          G, x_d, SPECDEC_DTYPE_BF16, 2, y_d, stream) == SPECDEC_OK);
  CHECK(cu.stream_sync(stream) == 0);
  to_host(y_gpu, y_d, sizeof y_gpu);
  /* Both round one f32 sum to bf16; the sums differ only in order, so the results are at most an ulp apart. */
  for (i = 0; i < 2 * N; ++i) {
    float a = bf16_to_float(y[i]), b = bf16_to_float(y_gpu[i]);
    if (!(fabsf(a - b) <= fabsf(a) / 128.0f + 1e-6f)) ++bad;
  }
  CHECK(bad == 0);
  release(w_d);
  release(packed_d);
  release(scales_d);
  release(zeros_d);
  release(x_d);
  release(y_d);
}

/* The CPU test's two-node chain on the device: the same outputs within bf16 rounding, the same cache append,
 * the same compaction. */
static void test_device_tree_attention(specdec_context* cpu, specdec_context* gpu, void* stream) {
  enum { D = 64, HQ = 2, HKV = 1, N = 2, PAGES = 2, PS = 16 };
  uint16_t q[N * HQ * D], k[N * HKV * D], v[N * HKV * D], out[N * HQ * D], out_gpu[N * HQ * D];
  static uint16_t k_cache[PAGES * PS * HKV * D], v_cache[PAGES * PS * HKV * D], cache_gpu[PAGES * PS * HKV * D];
  float lse[N * HQ], lse_gpu[N * HQ];
  const int32_t offsets[2] = {0, N}, parents[N] = {-1, 0}, prefix[1] = {0}, table[1] = {1};
  const int32_t acc_offsets[2] = {0, 1}, acc_nodes[1] = {1};
  int32_t status[1] = {-9};
  void *q_d, *k_d, *v_d, *offsets_d, *parents_d, *prefix_d, *table_d, *k_cache_d, *v_cache_d;
  void *out_d = poisoned(sizeof out), *lse_d = poisoned(sizeof lse), *status_d = poisoned(sizeof status);
  void *acc_offsets_d, *acc_nodes_d;
  void *k_layers[1], *v_layers[1];
  int i, bad = 0;
  for (i = 0; i < N * HQ * D; ++i) q[i] = bf16_of((float)((i * 7) % 5 - 2) * 0.25f);
  for (i = 0; i < N * HKV * D; ++i) {
    k[i] = bf16_of((float)((i * 3) % 7 - 3) * 0.125f);
    v[i] = bf16_of((float)(i % 9 - 4) * 0.5f);
  }
  q_d = to_device(q, sizeof q);
  k_d = to_device(k, sizeof k);
  v_d = to_device(v, sizeof v);
  offsets_d = to_device(offsets, sizeof offsets);
  parents_d = to_device(parents, sizeof parents);
  prefix_d = to_device(prefix, sizeof prefix);
  table_d = to_device(table, sizeof table);
  k_cache_d = to_device(k_cache, sizeof k_cache);
  v_cache_d = to_device(v_cache, sizeof v_cache);
  CHECK(specdec_tree_attention(cpu, SPECDEC_DTYPE_BF16, q, k, v, 1, N, HQ, 4, offsets, parents, prefix, table, k_cache,
                               v_cache, PAGES, PS, HKV, D, 1, NULL, 0, 0, 0.125f, out, lse, NULL, NULL) == SPECDEC_OK);
  CHECK(specdec_tree_attention(gpu, SPECDEC_DTYPE_BF16, q_d, k_d, v_d, 1, N, HQ, 4, (const int32_t*)offsets_d,
                               (const int32_t*)parents_d, (const int32_t*)prefix_d, (const int32_t*)table_d, k_cache_d,
                               v_cache_d, PAGES, PS, HKV, D, 1, NULL, 0, 0, 0.125f, out_d, (float*)lse_d,
                               (int32_t*)status_d, stream) == SPECDEC_OK);
  CHECK(cu.stream_sync(stream) == 0);
  to_host(out_gpu, out_d, sizeof out_gpu);
  to_host(lse_gpu, lse_d, sizeof lse_gpu);
  to_host(status, status_d, sizeof status);
  CHECK(status[0] == 0);
  for (i = 0; i < N * HQ * D; ++i) {
    float a = f32_of_bf16(out[i]), b = f32_of_bf16(out_gpu[i]);
    if (!(fabsf(a - b) <= fabsf(a) / 64.0f + 1e-3f)) ++bad;
  }
  for (i = 0; i < N * HQ; ++i) {
    if (!(fabsf(lse[i] - lse_gpu[i]) <= 1e-4f * (1.0f + fabsf(lse[i])))) ++bad;
  }
  CHECK(bad == 0);
  to_host(cache_gpu, k_cache_d, sizeof cache_gpu);
  CHECK(memcmp(&cache_gpu[PS * D], k, sizeof k) == 0);
  to_host(cache_gpu, v_cache_d, sizeof cache_gpu);
  CHECK(memcmp(&cache_gpu[PS * D], v, sizeof v) == 0);
  acc_offsets_d = to_device(acc_offsets, sizeof acc_offsets);
  acc_nodes_d = to_device(acc_nodes, sizeof acc_nodes);
  k_layers[0] = k_cache_d;
  v_layers[0] = v_cache_d;
  CHECK(specdec_tree_kv_compact(gpu, k_layers, v_layers, 1, PAGES, PS, HKV, D, 1, 1, (const int32_t*)acc_offsets_d,
                                (const int32_t*)acc_nodes_d, 1, (const int32_t*)prefix_d, (const int32_t*)table_d, NULL,
                                stream) == SPECDEC_OK);
  CHECK(cu.stream_sync(stream) == 0);
  to_host(cache_gpu, k_cache_d, sizeof cache_gpu);
  CHECK(memcmp(&cache_gpu[PS * D], &k[D], D * 2) == 0);
  to_host(cache_gpu, v_cache_d, sizeof cache_gpu);
  CHECK(memcmp(&cache_gpu[PS * D], &v[D], D * 2) == 0);
  release(q_d);
  release(k_d);
  release(v_d);
  release(offsets_d);
  release(parents_d);
  release(prefix_d);
  release(table_d);
  release(k_cache_d);
  release(v_cache_d);
  release(out_d);
  release(lse_d);
  release(status_d);
  release(acc_offsets_d);
  release(acc_nodes_d);
}

static void test_device_pointers(specdec_context* cpu) {
  const char* require = getenv("SPECDEC_REQUIRE_GPU");
  specdec_context* gpu = NULL;
  void *primary = NULL, *popped = NULL, *stream = NULL;
  specdec_status s = specdec_context_create_cuda(0, &gpu);
  if (s != SPECDEC_OK) {
    if (require != NULL && strcmp(require, "1") == 0) {
      ++failed;
      fprintf(stderr, "SPECDEC_REQUIRE_GPU=1 but no CUDA context: %s: %s\n", specdec_status_string((int32_t)s),
              specdec_last_error());
    } else {
      printf("SKIPPED device-pointer checks: %s: %s\n", specdec_status_string((int32_t)s), specdec_last_error());
    }
    return;
  }
  CHECK(open_driver());
  if (cu.lib == NULL) return;
  /* The caller's side: the device's primary context current, and a stream of its own. */
  CHECK(cu.ctx_retain(&primary, 0) == 0 && cu.ctx_push(primary) == 0);
  CHECK(cu.stream_create(&stream, 0) == 0);
  test_device_greedy(gpu, stream);
  test_device_rejection(gpu, stream);
  test_device_int4(cpu, gpu, stream);
  test_device_tree_attention(cpu, gpu, stream);
  CHECK(cu.stream_destroy(stream) == 0);
  CHECK(cu.ctx_pop(&popped) == 0 && popped == primary);
  CHECK(cu.ctx_release(0) == 0);
  CHECK(specdec_context_destroy(gpu) == SPECDEC_OK);
}

int main(void) {
  specdec_context* ctx = NULL;
  int32_t backend = -1;

  CHECK(specdec_version() == SPECDEC_VERSION);
  CHECK(SPECDEC_VERSION == SPECDEC_VERSION_MAJOR * 1000000 + SPECDEC_VERSION_MINOR * 1000 + SPECDEC_VERSION_PATCH);
  CHECK(strlen(specdec_version_string()) >= 5);
  CHECK(strcmp(specdec_status_string(SPECDEC_OK), "SPECDEC_OK") == 0);
  CHECK(strcmp(specdec_status_string(SPECDEC_PANIC), "SPECDEC_PANIC") == 0);
  CHECK(strcmp(specdec_status_string(12345), "SPECDEC_UNKNOWN_STATUS") == 0);

  EXPECT_INVALID(specdec_context_create_cpu(NULL), "out");
  EXPECT_INVALID(specdec_context_create_cuda(-1, &ctx), "device_ordinal");
  CHECK(ctx == NULL);
  {
    /* Without a GPU this fails cleanly; with one it succeeds. Either way: a status, never a crash. */
    specdec_context* cuda = NULL;
    specdec_status s = specdec_context_create_cuda(0, &cuda);
    CHECK(s == SPECDEC_OK || s == SPECDEC_KERNELS_NOT_COMPILED || s == SPECDEC_NO_DRIVER || s == SPECDEC_NO_DEVICE ||
          s == SPECDEC_UNSUPPORTED_ARCHITECTURE);
    CHECK((s == SPECDEC_OK) == (cuda != NULL));
    CHECK(s == SPECDEC_OK || strlen(specdec_last_error()) > 0);
    CHECK(specdec_context_destroy(cuda) == SPECDEC_OK);
  }

  CHECK(specdec_context_create_cpu(&ctx) == SPECDEC_OK && ctx != NULL);
  CHECK(specdec_context_backend(ctx, &backend) == SPECDEC_OK && backend == SPECDEC_BACKEND_CPU);
  EXPECT_INVALID(specdec_context_backend(ctx, NULL), "out_backend");
  EXPECT_INVALID(specdec_context_backend(NULL, &backend), "ctx");

  test_greedy_every_dtype(ctx);
  test_greedy_bad_arguments(ctx);
  test_greedy_request_status(ctx);
  test_empty_batch(ctx);
  test_drafter();
  test_handles();
  test_policy();
  test_rejection_chain_and_tree(ctx);
  test_tree_converters();
  test_int4(ctx);
  test_tree_attention(ctx);
  test_device_pointers(ctx);

  CHECK(specdec_context_destroy(ctx) == SPECDEC_OK);
  CHECK(specdec_context_destroy(NULL) == SPECDEC_OK);

  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
