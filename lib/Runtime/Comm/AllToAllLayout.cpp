//===- AllToAllLayout.cpp - The row mapping of all_to_all -----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the packing and unpacking of all_to_all rows: L runs
// of Cq contiguous rows per peer, one memcpy each.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/AllToAllLayout.h"

#include <cstring>

namespace flex {

void AllToAllLayout::pack(AllToAllDirection direction, const void *input,
                          int64_t rowBytes, void *staging) const {
  const int64_t runBytes = chunkRows() * rowBytes;
  const auto *src = static_cast<const char *>(input);
  auto *dst = static_cast<char *>(staging);
  for (int64_t peer = 0; peer < ranks; ++peer)
    for (int64_t l = 0; l < localExperts; ++l) {
      int64_t row = direction == AllToAllDirection::Dispatch
                        ? dispatchLayoutRow(peer, l)
                        : receivedLayoutRow(peer, l);
      std::memcpy(dst + (peer * localExperts + l) * runBytes,
                  src + row * rowBytes, static_cast<size_t>(runBytes));
    }
}

void AllToAllLayout::unpack(AllToAllDirection direction, const void *staging,
                            int64_t rowBytes, void *output) const {
  const int64_t runBytes = chunkRows() * rowBytes;
  const auto *src = static_cast<const char *>(staging);
  auto *dst = static_cast<char *>(output);
  for (int64_t peer = 0; peer < ranks; ++peer)
    for (int64_t l = 0; l < localExperts; ++l) {
      int64_t row = direction == AllToAllDirection::Dispatch
                        ? receivedLayoutRow(peer, l)
                        : dispatchLayoutRow(peer, l);
      std::memcpy(dst + row * rowBytes,
                  src + (peer * localExperts + l) * runBytes,
                  static_cast<size_t>(runBytes));
    }
}

void AllToAllLayout::blocks(AllToAllDirection direction, int64_t rowBytes,
                            std::vector<Communicator::Block> &send,
                            std::vector<Communicator::Block> &recv) const {
  const int64_t runBytes = chunkRows() * rowBytes;
  const bool dispatch = direction == AllToAllDirection::Dispatch;
  send.clear();
  recv.clear();
  for (int64_t peer = 0; peer < ranks; ++peer)
    for (int64_t l = 0; l < localExperts; ++l) {
      int64_t from = dispatch ? dispatchLayoutRow(peer, l)
                              : receivedLayoutRow(peer, l);
      int64_t to = dispatch ? receivedLayoutRow(peer, l)
                            : dispatchLayoutRow(peer, l);
      send.push_back({static_cast<int>(peer), from * rowBytes, runBytes});
      recv.push_back({static_cast<int>(peer), to * rowBytes, runBytes});
    }
}

} // namespace flex
