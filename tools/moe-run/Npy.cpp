//===- Npy.cpp - A small reader and writer of NumPy .npy files ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the .npy format (NEP 1): a magic string, a version, a
// header length, a Python dict literal with descr, fortran_order and shape,
// padded with spaces to a multiple of 64 bytes, then the raw data.
//
//===----------------------------------------------------------------------===//

#include "Npy.h"

#include "flex/Runtime/Core/Half.h"

#include <cstring>
#include <fstream>
#include <sstream>

namespace flex::npy {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

Status bad(const std::string &path, const std::string &why) {
  return Status(StatusCode::InvalidArgument, "'" + path + "': " + why);
}

/// The element size of the type strings we handle; 0 when unsupported.
size_t elementSize(const std::string &descr) {
  if (descr == "<f4" || descr == "<i4" || descr == "<u4")
    return 4;
  if (descr == "<f8" || descr == "<i8")
    return 8;
  if (descr == "<f2" || descr == "<u2" || descr == "<i2")
    return 2;
  return 0;
}

std::string shapeString(const std::vector<int64_t> &shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    text += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1)
    text += ",";
  return text + ")";
}

/// The text after `key` in the header dict, or npos.
size_t findValue(const std::string &header, const std::string &key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos)
    return std::string::npos;
  at = header.find(':', at);
  if (at == std::string::npos)
    return std::string::npos;
  ++at;
  while (at < header.size() && header[at] == ' ')
    ++at;
  return at;
}

} // namespace

Status readArray(const std::string &path, Array &array) {
  std::ifstream file(path, std::ios::binary);
  if (!file)
    return Status(StatusCode::IOError, "cannot open '" + path + "'");
  std::string bytes((std::istreambuf_iterator<char>(file)),
                    std::istreambuf_iterator<char>());
  if (bytes.size() < kMagicSize + 4 ||
      std::memcmp(bytes.data(), kMagic, kMagicSize) != 0)
    return bad(path, "not a .npy file (no \\x93NUMPY magic)");
  uint8_t major = static_cast<uint8_t>(bytes[6]);
  size_t headerLength, headerStart;
  if (major == 1) {
    headerLength = static_cast<uint8_t>(bytes[8]) |
                   (static_cast<size_t>(static_cast<uint8_t>(bytes[9])) << 8);
    headerStart = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12)
      return bad(path, "truncated header");
    headerLength = 0;
    for (int i = 0; i < 4; ++i)
      headerLength |= static_cast<size_t>(static_cast<uint8_t>(bytes[8 + i]))
                      << (8 * i);
    headerStart = 12;
  } else {
    return bad(path, ".npy format version " + std::to_string(major) +
                         " is not supported; allowed: 1, 2, 3");
  }
  if (bytes.size() < headerStart + headerLength)
    return bad(path, "truncated header");
  std::string header = bytes.substr(headerStart, headerLength);

  size_t at = findValue(header, "descr");
  if (at == std::string::npos || at >= header.size() || header[at] != '\'')
    return bad(path, "header has no 'descr'");
  size_t end = header.find('\'', at + 1);
  if (end == std::string::npos)
    return bad(path, "header has a broken 'descr'");
  array.descr = header.substr(at + 1, end - at - 1);
  if (array.descr.size() == 3 && array.descr[0] == '|')
    array.descr[0] = '<'; // one-byte types have no byte order
  if (!array.descr.empty() && array.descr[0] == '>')
    return bad(path, "big-endian data ('" + array.descr +
                         "') is not supported; save little-endian");
  if (!elementSize(array.descr))
    return bad(path, "element type '" + array.descr +
                         "' is not supported; allowed: <f4, <f8, <f2, <u2, "
                         "<i4, <i8, <u4, <i2");

  at = findValue(header, "fortran_order");
  if (at == std::string::npos)
    return bad(path, "header has no 'fortran_order'");
  if (header.compare(at, 4, "True") == 0)
    return bad(path, "Fortran-ordered arrays are not supported; save with "
                     "np.ascontiguousarray");

  at = findValue(header, "shape");
  if (at == std::string::npos || header[at] != '(')
    return bad(path, "header has no 'shape' tuple");
  end = header.find(')', at);
  if (end == std::string::npos)
    return bad(path, "header has a broken 'shape'");
  array.shape.clear();
  std::string dims = header.substr(at + 1, end - at - 1);
  std::stringstream stream(dims);
  std::string item;
  int64_t count = 1;
  while (std::getline(stream, item, ',')) {
    size_t first = item.find_first_not_of(' ');
    if (first == std::string::npos)
      continue;
    char *stop = nullptr;
    long long dim = std::strtoll(item.c_str() + first, &stop, 10);
    if (dim < 0 || (stop && *stop && *stop != ' ' && *stop != 'L'))
      return bad(path, "bad dimension '" + item + "' in shape");
    array.shape.push_back(dim);
    if (__builtin_mul_overflow(count, static_cast<int64_t>(dim), &count))
      return bad(path, "shape overflows int64");
  }
  int64_t dataBytes;
  if (__builtin_mul_overflow(count,
                             static_cast<int64_t>(elementSize(array.descr)),
                             &dataBytes))
    return bad(path, "size overflows int64");
  size_t dataStart = headerStart + headerLength;
  if (bytes.size() - dataStart < static_cast<uint64_t>(dataBytes))
    return bad(path, "truncated: shape " + shapeString(array.shape) +
                         " of " + array.descr + " needs " +
                         std::to_string(dataBytes) + " data bytes, the file has " +
                         std::to_string(bytes.size() - dataStart));
  array.data.assign(bytes.begin() + dataStart,
                    bytes.begin() + dataStart + dataBytes);
  return Status::ok();
}

Status writeArray(const std::string &path, const Array &array) {
  std::string header = "{'descr': '" + array.descr +
                       "', 'fortran_order': False, 'shape': " +
                       shapeString(array.shape) + ", }";
  // Pad so that the data starts at a multiple of 64 bytes; end with '\n'.
  size_t prefix = kMagicSize + 2 + 2;
  bool wide = prefix + header.size() + 1 > 65535;
  if (wide)
    prefix += 2;
  size_t total = (prefix + header.size() + 1 + 63) / 64 * 64;
  header.append(total - prefix - header.size() - 1, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  if (!file)
    return Status(StatusCode::IOError, "cannot create '" + path + "'");
  file.write(kMagic, kMagicSize);
  char version[2] = {static_cast<char>(wide ? 2 : 1), 0};
  file.write(version, 2);
  uint32_t length = static_cast<uint32_t>(header.size());
  char lengthBytes[4] = {static_cast<char>(length & 0xff),
                         static_cast<char>((length >> 8) & 0xff),
                         static_cast<char>((length >> 16) & 0xff),
                         static_cast<char>((length >> 24) & 0xff)};
  file.write(lengthBytes, wide ? 4 : 2);
  file << header;
  file.write(reinterpret_cast<const char *>(array.data.data()),
             static_cast<std::streamsize>(array.data.size()));
  if (!file)
    return Status(StatusCode::IOError, "cannot write '" + path + "'");
  return Status::ok();
}

Status readAs(const std::string &path, DType dtype,
              const std::vector<int64_t> &shape, std::vector<uint8_t> &out) {
  Array array;
  if (Status status = readArray(path, array); !status)
    return status;
  bool sameShape = array.shape == shape ||
                   (array.shape.empty() && shape == std::vector<int64_t>{1});
  if (!sameShape) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i)
      want += (i ? ", " : "") + std::to_string(shape[i]);
    return bad(path, "shape " + shapeString(array.shape) +
                         " disagrees with the argument's " + want +
                         (shape.size() == 1 ? ",)" : ")"));
  }
  int64_t count = 1;
  for (int64_t dim : shape)
    count *= dim;
  out.assign(count * dtypeSize(dtype), 0);
  const std::string &d = array.descr;
  auto source = [&](int64_t i) -> double {
    const uint8_t *p = array.data.data() + i * elementSize(d);
    if (d == "<f4") {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    double v;
    std::memcpy(&v, p, 8);
    return v;
  };
  auto unsupported = [&]() {
    return bad(path, "element type '" + d + "' cannot be read as a " +
                         std::string(toString(dtype)) +
                         " argument; allowed: " +
                         (dtype == DType::F32   ? "<f4, <f8"
                          : dtype == DType::F16 ? "<f2, <f4, <f8"
                          : dtype == DType::BF16
                              ? "<u2 (raw bf16 bits), <f4, <f8"
                              : "<i4"));
  };
  bool raw = (dtype == DType::F32 && d == "<f4") ||
             (dtype == DType::F16 && d == "<f2") ||
             (dtype == DType::BF16 && d == "<u2") ||
             (dtype == DType::I32 && d == "<i4");
  if (raw) {
    std::memcpy(out.data(), array.data.data(), out.size());
    return Status::ok();
  }
  if (dtype == DType::I32 || (d != "<f4" && d != "<f8"))
    return unsupported();
  for (int64_t i = 0; i < count; ++i) {
    double value = source(i);
    switch (dtype) {
    case DType::F32: {
      float v = static_cast<float>(value);
      std::memcpy(out.data() + 4 * i, &v, 4);
      break;
    }
    case DType::BF16: {
      uint16_t v = floatToBf16(static_cast<float>(value));
      std::memcpy(out.data() + 2 * i, &v, 2);
      break;
    }
    case DType::F16: {
      uint16_t v = floatToF16(static_cast<float>(value));
      std::memcpy(out.data() + 2 * i, &v, 2);
      break;
    }
    case DType::I32:
      break;
    }
  }
  return Status::ok();
}

Status writeFrom(const std::string &path, DType dtype,
                 const std::vector<int64_t> &shape, const void *data) {
  Array array;
  array.shape = shape;
  int64_t count = 1;
  for (int64_t dim : shape)
    count *= dim;
  const auto *bytes = static_cast<const uint8_t *>(data);
  switch (dtype) {
  case DType::F32:
  case DType::F16:
  case DType::I32:
    array.descr = dtype == DType::F32 ? "<f4" : dtype == DType::F16 ? "<f2"
                                                                    : "<i4";
    array.data.assign(bytes, bytes + count * dtypeSize(dtype));
    break;
  case DType::BF16:
    // NumPy has no bf16; widening to f32 is exact.
    array.descr = "<f4";
    array.data.resize(count * 4);
    for (int64_t i = 0; i < count; ++i) {
      uint16_t bits;
      std::memcpy(&bits, bytes + 2 * i, 2);
      float value = bf16ToFloat(bits);
      std::memcpy(array.data.data() + 4 * i, &value, 4);
    }
    break;
  }
  return writeArray(path, array);
}

} // namespace flex::npy
