// Warp collectives as the PTX ISA defines them: shfl.sync, vote.sync, bar.warp.sync, mma.sync m16n8k16 and
// ldmatrix. Called by the executor when the last lane of a collective's mask arrives; every lane's op holds its
// inputs, and each gets its outputs.
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <string>

#include "runtime.h"
#include "specdec_sim/narrow_float.h"

namespace specdec_sim {
namespace {

std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Format(const char* fmt, ...) {
  char buffer[512];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  return buffer;
}

CollectiveError Error(FaultKind kind, std::string message) { return {kind, std::move(message)}; }

// shfl.sync (PTX ISA, "Parallel Synchronization and Communication Instructions: shfl.sync"). CUDA's
// __shfl_*_sync(mask, var, b, width) is shfl.sync with c = ((32 - width) << 8) | (up ? 0 : 0x1F): a segment
// mask and a clamp. A lane whose source is out of range gets its own value.
CollectiveError Shuffle(specdec_sim_warp_op* const ops[32], uint32_t mask) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    specdec_sim_warp_op* op = ops[lane];
    const int width = op->width;
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
      return Error(FaultKind::kIllegalInstruction,
                   Format("%s with width %d (must be a power of two from 1 to 32)", CollectiveName(op->kind), width));
    }
    const uint32_t segmask = static_cast<uint32_t>(32 - width) & 0x1Fu;
    const uint32_t clamp = op->kind == SPECDEC_SIM_SHFL_UP ? 0u : 0x1Fu;
    const uint32_t b = static_cast<uint32_t>(op->operand) & 0x1Fu;
    const int max_lane = static_cast<int>((static_cast<uint32_t>(lane) & segmask) | (clamp & ~segmask));
    const int min_lane = static_cast<int>(static_cast<uint32_t>(lane) & segmask);
    int j;
    bool in_range;
    switch (op->kind) {
      case SPECDEC_SIM_SHFL_UP:
        j = lane - static_cast<int>(b);
        in_range = j >= max_lane;
        break;
      case SPECDEC_SIM_SHFL_DOWN:
        j = lane + static_cast<int>(b);
        in_range = j <= max_lane;
        break;
      case SPECDEC_SIM_SHFL_BFLY:
        j = lane ^ static_cast<int>(b);
        in_range = j <= max_lane;
        break;
      default:  // idx
        j = min_lane | static_cast<int>(b & ~segmask);
        in_range = j <= max_lane;
        break;
    }
    if (!in_range) j = lane;
    if (!((mask >> j) & 1u)) {
      return Error(FaultKind::kIllegalInstruction,
                   Format("%s: lane %d reads lane %d, which is not in the mask 0x%08x (the result is undefined)",
                          CollectiveName(op->kind), lane, j, mask));
    }
    op->result = ops[j]->value;
  }
  return {};
}

CollectiveError Vote(specdec_sim_warp_op* const ops[32], uint32_t mask) {
  uint32_t ballot = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) && ops[lane]->value != 0) ballot |= 1u << lane;
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    specdec_sim_warp_op* op = ops[lane];
    switch (op->kind) {
      case SPECDEC_SIM_VOTE_ALL:
        op->result = ballot == mask;
        break;
      case SPECDEC_SIM_VOTE_ANY:
        op->result = ballot != 0;
        break;
      default:
        op->result = ballot;
        break;
    }
  }
  return {};
}

double Half(uint32_t reg, int which, bool bf16) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * which));
  return NarrowToDouble(bits, bf16 ? kBfloat16 : kHalf);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, fragments as in the PTX ISA's figures for
// m16n8k16 (groupID = lane >> 2, threadID_in_group = lane % 4):
//   A (16 x 16, row major), a_i in register i / 2, half i % 2: row groupID (i in 0,1,4,5) or groupID + 8
//     (2,3,6,7); column 2 threadID_in_group + (i & 1), plus 8 for i >= 4.
//   B (16 x 8, column major), b_i in register i / 2, half i % 2: row 2 threadID_in_group + (i & 1), plus 8
//     for i >= 2; column groupID.
//   C, D (16 x 8, f32): c_i row groupID (i < 2) or groupID + 8; column 2 threadID_in_group + (i & 1).
// Each D element is the f64 sum, in k order, of the 16 exact products plus C, rounded once to f32. (The
// tensor cores' accumulation order and rounding are not specified; this is the exact-then-round model.)
CollectiveError Mma(specdec_sim_warp_op* const ops[32]) {
  const bool bf16 = ops[0]->kind == SPECDEC_SIM_MMA_M16N8K16_BF16;
  double a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const specdec_sim_warp_op* op = ops[lane];
    const int group = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = group + ((i & 2) ? 8 : 0);
      const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = Half(op->a[i / 2], i % 2, bf16);
    }
    for (int i = 0; i < 4; ++i) {
      const int row = 2 * tig + (i & 1) + (i >= 2 ? 8 : 0);
      b[row][group] = Half(op->b[i / 2], i % 2, bf16);
    }
    for (int i = 0; i < 4; ++i) c[group + (i >= 2 ? 8 : 0)][2 * tig + (i & 1)] = op->c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    specdec_sim_warp_op* op = ops[lane];
    const int group = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      const float d = static_cast<float>(sum + c[row][col]);
      memcpy(&op->d[i], &d, 4);
    }
  }
  return {};
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16: lanes 8j .. 8j + 7 give the (16-byte aligned) row
// addresses of matrix j; lane l receives in register j the elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1)
// of matrix j, low half first; with .trans, of its transpose.
CollectiveError LdMatrix(specdec_sim_warp_op* const ops[32], const unsigned char* shared_base, size_t shared_size) {
  const int matrices = ops[0]->operand & 7;
  const bool trans = (ops[0]->operand & 8) != 0;
  if (matrices != 1 && matrices != 2 && matrices != 4) {
    return Error(FaultKind::kIllegalInstruction, Format("ldmatrix with %d matrices", matrices));
  }
  for (int lane = 1; lane < 32; ++lane) {
    if (ops[lane]->operand != ops[0]->operand) {
      return Error(FaultKind::kIllegalInstruction, "ldmatrix: the lanes of the warp disagree on .num or .trans");
    }
  }
  uint16_t m[4][8][8];
  for (int j = 0; j < matrices; ++j) {
    for (int r = 0; r < 8; ++r) {
      const uint64_t address = ops[8 * j + r]->value;
      if (address % 16 != 0) {
        return Error(FaultKind::kMisalignedAddress,
                     Format("ldmatrix: lane %d's row address 0x%llx is not 16-byte aligned", 8 * j + r,
                            static_cast<unsigned long long>(address)));
      }
      if (address + 16 > shared_size) {
        return Error(FaultKind::kIllegalAddress,
                     Format("ldmatrix: lane %d's row address 0x%llx is outside the block's %zu bytes of shared memory",
                            8 * j + r, static_cast<unsigned long long>(address), shared_size));
      }
      memcpy(m[j][r], shared_base + address, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int row = lane / 4, col = 2 * (lane % 4);
    for (int j = 0; j < matrices; ++j) {
      const uint16_t lo = trans ? m[j][col][row] : m[j][row][col];
      const uint16_t hi = trans ? m[j][col + 1][row] : m[j][row][col + 1];
      ops[lane]->d[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
  return {};
}

}  // namespace

const char* CollectiveName(int kind) {
  switch (kind) {
    case SPECDEC_SIM_SHFL_IDX:
      return "__shfl_sync";
    case SPECDEC_SIM_SHFL_UP:
      return "__shfl_up_sync";
    case SPECDEC_SIM_SHFL_DOWN:
      return "__shfl_down_sync";
    case SPECDEC_SIM_SHFL_BFLY:
      return "__shfl_xor_sync";
    case SPECDEC_SIM_VOTE_ALL:
      return "__all_sync";
    case SPECDEC_SIM_VOTE_ANY:
      return "__any_sync";
    case SPECDEC_SIM_VOTE_BALLOT:
      return "__ballot_sync";
    case SPECDEC_SIM_SYNCWARP:
      return "__syncwarp";
    case SPECDEC_SIM_MMA_M16N8K16_F16:
      return "mma.sync.m16n8k16 (f16)";
    case SPECDEC_SIM_MMA_M16N8K16_BF16:
      return "mma.sync.m16n8k16 (bf16)";
    case SPECDEC_SIM_LDMATRIX:
      return "ldmatrix";
    default:
      return "an unknown collective";
  }
}

CollectiveError CompleteCollective(specdec_sim_warp_op* const ops[32], uint32_t mask, const unsigned char* shared_base,
                                   size_t shared_size) {
  const int first = __builtin_ctz(mask);
  switch (ops[first]->kind) {
    case SPECDEC_SIM_SHFL_IDX:
    case SPECDEC_SIM_SHFL_UP:
    case SPECDEC_SIM_SHFL_DOWN:
    case SPECDEC_SIM_SHFL_BFLY:
      return Shuffle(ops, mask);
    case SPECDEC_SIM_VOTE_ALL:
    case SPECDEC_SIM_VOTE_ANY:
    case SPECDEC_SIM_VOTE_BALLOT:
      return Vote(ops, mask);
    case SPECDEC_SIM_SYNCWARP:
      return {};
    case SPECDEC_SIM_MMA_M16N8K16_F16:
    case SPECDEC_SIM_MMA_M16N8K16_BF16:
      return Mma(ops);
    case SPECDEC_SIM_LDMATRIX:
      return LdMatrix(ops, shared_base, shared_size);
    default:
      return Error(FaultKind::kIllegalInstruction, Format("unknown collective %d", ops[first]->kind));
  }
}

}  // namespace specdec_sim
