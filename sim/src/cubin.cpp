// Reads what the driver reads from a module image: the fatbin's entries (nvcc's container: a 16-byte header,
// then entries each with a header naming its kind, architecture and source file), and from each cubin (an
// ELF64 file) its kernels: `.nv.info.<kernel>` attributes (maximum threads from __launch_bounds__, parameter
// sizes), the register counts in `.nv.info`, and static shared memory from `.nv.shared.<kernel>`.
//
// The attribute codes (EIATTR_*) are the ones nvdisasm prints; the layouts were checked against ptxas's own
// report (-Xptxas -v) for every kernel of this repository.
#include <string.h>

#include <map>
#include <string>

#include "runtime.h"

namespace specdec_sim {
namespace {

constexpr uint32_t kFatbinMagic = 0xBA55ED50u;
constexpr uint16_t kEntryPtx = 1;
constexpr uint16_t kEntryElf = 2;
constexpr uint8_t kAttrMaxThreads = 0x05;  // EIATTR_MAX_THREADS: x, y, z
constexpr uint8_t kAttrKparamInfo = 0x17;  // EIATTR_KPARAM_INFO: index, ordinal, offset, size << 18
constexpr uint8_t kAttrRegcount = 0x2f;    // EIATTR_REGCOUNT (in .nv.info): symbol, registers
constexpr uint8_t kFormatSval = 0x04;      // an attribute with a 16-bit size and that many bytes

template <typename T>
T Read(const unsigned char* p) {
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}

struct Section {
  std::string name;
  const unsigned char* data;
  uint64_t size;
};

// Calls visit(attribute, value, size) for each attribute of a .nv.info section.
template <typename Visit>
void ForEachAttribute(const Section& s, Visit visit) {
  uint64_t at = 0;
  while (at + 4 <= s.size) {
    const uint8_t format = s.data[at], attribute = s.data[at + 1];
    if (format == kFormatSval) {
      const uint16_t size = Read<uint16_t>(s.data + at + 2);
      if (at + 4 + size > s.size) return;
      visit(attribute, s.data + at + 4, size);
      at += 4 + size;
    } else {
      visit(attribute, s.data + at + 2, static_cast<uint16_t>(2));
      at += 4;
    }
  }
}

bool ParseCubin(const unsigned char* elf, uint64_t size, int arch, Cubin* out, std::string* error) {
  if (size < 64 ||
      memcmp(elf,
             "\x7f"
             "ELF",
             4) != 0 ||
      elf[4] != 2 || elf[5] != 1) {
    *error = "a cubin that is not a little-endian ELF64 file";
    return false;
  }
  const uint64_t shoff = Read<uint64_t>(elf + 0x28);
  const uint16_t shentsize = Read<uint16_t>(elf + 0x3a), shnum = Read<uint16_t>(elf + 0x3c),
                 shstrndx = Read<uint16_t>(elf + 0x3e);
  if (shoff + static_cast<uint64_t>(shnum) * shentsize > size || shstrndx >= shnum) {
    *error = "a truncated cubin";
    return false;
  }
  std::vector<Section> sections;
  std::vector<uint32_t> types;
  const unsigned char* shstr = elf + Read<uint64_t>(elf + shoff + shstrndx * shentsize + 0x18);
  for (int i = 0; i < shnum; ++i) {
    const unsigned char* h = elf + shoff + static_cast<uint64_t>(i) * shentsize;
    const uint32_t name = Read<uint32_t>(h), type = Read<uint32_t>(h + 4);
    const uint64_t offset = Read<uint64_t>(h + 0x18), bytes = Read<uint64_t>(h + 0x20);
    sections.push_back({reinterpret_cast<const char*>(shstr + name), elf + offset, bytes});
    types.push_back(type);
    if (type != 8 /* SHT_NOBITS */ && offset + bytes > size) {
      *error = "a cubin section past the end of the file";
      return false;
    }
  }
  // Symbol names by index, for the register counts.
  std::vector<std::string> symbols;
  for (size_t i = 0; i < sections.size(); ++i) {
    if (types[i] != 2 /* SHT_SYMTAB */) continue;
    const unsigned char* h = elf + shoff + i * shentsize;
    const unsigned char* strtab = sections[Read<uint32_t>(h + 0x28)].data;
    for (uint64_t at = 0; at + 24 <= sections[i].size; at += 24) {
      symbols.emplace_back(reinterpret_cast<const char*>(strtab + Read<uint32_t>(sections[i].data + at)));
    }
  }
  std::map<std::string, CubinKernel> kernels;
  std::map<std::string, int> registers;
  std::map<std::string, size_t> shared;
  for (const Section& s : sections) {
    if (s.name.rfind(".nv.info.", 0) == 0) {
      CubinKernel& k = kernels[s.name.substr(9)];
      k.name = s.name.substr(9);
      ForEachAttribute(s, [&](uint8_t attribute, const unsigned char* value, uint16_t bytes) {
        if (attribute == kAttrMaxThreads && bytes == 12) {
          k.max_threads =
              static_cast<int>(Read<uint32_t>(value) * Read<uint32_t>(value + 4) * Read<uint32_t>(value + 8));
        } else if (attribute == kAttrKparamInfo && bytes == 12) {
          const uint16_t ordinal = Read<uint16_t>(value + 4);
          const uint32_t param_size = (Read<uint32_t>(value + 8) >> 18) & 0x3FFFu;
          if (k.param_sizes.size() <= ordinal) k.param_sizes.resize(ordinal + 1u);
          k.param_sizes[ordinal] = param_size;
        }
      });
    } else if (s.name == ".nv.info") {
      ForEachAttribute(s, [&](uint8_t attribute, const unsigned char* value, uint16_t bytes) {
        if (attribute == kAttrRegcount && bytes == 8) {
          const uint32_t symbol = Read<uint32_t>(value);
          if (symbol < symbols.size()) registers[symbols[symbol]] = static_cast<int>(Read<uint32_t>(value + 4));
        }
      });
    } else if (s.name.rfind(".nv.shared.", 0) == 0 && s.name != ".nv.shared.reserved.0") {
      // The section holds the block's static shared memory after the driver's 1 KiB reservation (sm_80+).
      const size_t reserved = arch >= 80 ? kSharedReservedPerBlock : 0;
      shared[s.name.substr(11)] = s.size > reserved ? s.size - reserved : 0;
    }
  }
  out->arch = arch;
  for (auto& [name, k] : kernels) {
    k.registers = registers.count(name) ? registers[name] : 0;
    k.static_shared = shared.count(name) ? shared[name] : 0;
    out->kernels.push_back(k);
  }
  return true;
}

}  // namespace

bool ParseFatbin(const void* image, Fatbin* out, std::string* error) {
  const unsigned char* p = static_cast<const unsigned char*>(image);
  if (p == nullptr) {
    *error = "a null image";
    return false;
  }
  if (memcmp(p,
             "\x7f"
             "ELF",
             4) == 0) {
    // A bare cubin: its size is where its section headers end.
    const uint64_t shoff = Read<uint64_t>(p + 0x28);
    const uint64_t size = shoff + static_cast<uint64_t>(Read<uint16_t>(p + 0x3c)) * Read<uint16_t>(p + 0x3a);
    Cubin cubin;
    if (!ParseCubin(p, size, GetSettings().compute_capability, &cubin, error)) return false;
    out->cubins.push_back(cubin);
    return true;
  }
  if (Read<uint32_t>(p) != kFatbinMagic) {
    *error = "an image that is neither a fatbin nor a cubin (PTX text is not supported by the simulator)";
    return false;
  }
  const uint16_t header_size = Read<uint16_t>(p + 6);
  const uint64_t total = Read<uint64_t>(p + 8);
  uint64_t at = header_size;
  while (at < header_size + total) {
    const unsigned char* e = p + at;
    const uint16_t kind = Read<uint16_t>(e);
    const uint32_t entry_header = Read<uint32_t>(e + 4);
    const uint64_t payload = Read<uint64_t>(e + 8);
    const int arch = static_cast<int>(Read<uint32_t>(e + 28));
    const uint32_t name_offset = Read<uint32_t>(e + 32), name_length = Read<uint32_t>(e + 36);
    if (name_length > 0 && name_offset + name_length <= entry_header) {
      out->source.assign(reinterpret_cast<const char*>(e + name_offset), name_length);
    }
    const unsigned char* body = e + entry_header;
    if (kind == kEntryElf) {
      if (memcmp(body,
                 "\x7f"
                 "ELF",
                 4) != 0) {
        *error = "a compressed cubin (the simulator reads uncompressed ones; nvcc 13 compresses only PTX by default)";
        return false;
      }
      Cubin cubin;
      if (!ParseCubin(body, payload, arch, &cubin, error)) return false;
      out->cubins.push_back(cubin);
    } else if (kind == kEntryPtx) {
      out->ptx_archs.push_back(arch);
    }
    at += entry_header + payload;
  }
  return true;
}

}  // namespace specdec_sim
