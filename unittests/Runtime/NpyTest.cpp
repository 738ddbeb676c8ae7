//===- NpyTest.cpp - Tests of moe-run's .npy reader and writer ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the .npy round trip per argument dtype, the conversions of
// tools/moe-run/Npy.h, and the rejection of files moe-run cannot read.
//
//===----------------------------------------------------------------------===//

#include "Npy.h"

#include "flex/Runtime/Core/Half.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

using namespace flex;
using ::testing::HasSubstr;

namespace {

std::string tempPath(const std::string &name) {
  auto dir = std::filesystem::temp_directory_path() / "flex-npy-test";
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

template <typename T> std::vector<uint8_t> bytesOf(const std::vector<T> &v) {
  std::vector<uint8_t> bytes(v.size() * sizeof(T));
  std::memcpy(bytes.data(), v.data(), bytes.size());
  return bytes;
}

} // namespace

TEST(Npy, RoundTripsEachDtype) {
  std::vector<int64_t> shape = {2, 3};
  std::vector<float> f32 = {1.5f, -2.25f, 0.0f, 3e-8f, 65504.0f, -1.0f};
  std::vector<int32_t> i32 = {1, -2, 3, 1 << 30, -7, 0};
  std::vector<uint16_t> f16, bf16;
  for (float value : f32) {
    f16.push_back(floatToF16(value));
    bf16.push_back(floatToBf16(value));
  }
  struct Case {
    DType dtype;
    std::vector<uint8_t> data;
    const char *descr;
  } cases[] = {{DType::F32, bytesOf(f32), "<f4"},
               {DType::F16, bytesOf(f16), "<f2"},
               {DType::BF16, bytesOf(bf16), "<f4"},
               {DType::I32, bytesOf(i32), "<i4"}};
  for (const Case &c : cases) {
    std::string path = tempPath(std::string(toString(c.dtype)) + ".npy");
    ASSERT_TRUE(npy::writeFrom(path, c.dtype, shape, c.data.data()).isOk());
    npy::Array array;
    ASSERT_TRUE(npy::readArray(path, array).isOk());
    EXPECT_EQ(array.descr, c.descr);
    EXPECT_EQ(array.shape, shape);
    std::vector<uint8_t> back;
    Status status = npy::readAs(path, c.dtype, shape, back);
    ASSERT_TRUE(status.isOk()) << status.message();
    EXPECT_EQ(back, c.data) << toString(c.dtype);
  }
  // The data starts at a multiple of 64 bytes (NEP 1).
  std::ifstream file(tempPath("f32.npy"), std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(file)), {});
  EXPECT_EQ((text.size() - 24) % 64, 0u);
  EXPECT_EQ(text.substr(0, 6), "\x93NUMPY");
}

TEST(Npy, ConvertsOnRead) {
  std::string path = tempPath("f8.npy");
  std::vector<double> values = {1.0 / 3.0, -2.0, 1e-3};
  npy::Array array{"<f8", {3}, bytesOf(values)};
  ASSERT_TRUE(npy::writeArray(path, array).isOk());
  std::vector<uint8_t> out;
  ASSERT_TRUE(npy::readAs(path, DType::F32, {3}, out).isOk());
  float first;
  std::memcpy(&first, out.data(), 4);
  EXPECT_EQ(first, static_cast<float>(1.0 / 3.0));
  ASSERT_TRUE(npy::readAs(path, DType::BF16, {3}, out).isOk());
  uint16_t bits;
  std::memcpy(&bits, out.data(), 2);
  EXPECT_EQ(bits, floatToBf16(static_cast<float>(1.0 / 3.0)));
  // Raw bf16 bits from '<u2'.
  std::vector<uint16_t> raw = {0x3f80, 0xc000};
  ASSERT_TRUE(npy::writeArray(path, {"<u2", {2}, bytesOf(raw)}).isOk());
  ASSERT_TRUE(npy::readAs(path, DType::BF16, {2}, out).isOk());
  EXPECT_EQ(out, bytesOf(raw));
  // A scalar file fills a [1] argument.
  float scalar = 0.5f;
  ASSERT_TRUE(npy::writeArray(path, {"<f4", {}, bytesOf(std::vector<float>{
                                                    scalar})})
                  .isOk());
  ASSERT_TRUE(npy::readAs(path, DType::F32, {1}, out).isOk());
}

TEST(Npy, RejectsWhatItCannotRead) {
  std::string path = tempPath("bad.npy");
  std::ofstream(path) << "not numpy";
  npy::Array array;
  Status status = npy::readArray(path, array);
  EXPECT_FALSE(status.isOk());
  EXPECT_THAT(status.message(), HasSubstr("not a .npy file"));

  std::vector<float> values(6, 1.0f);
  ASSERT_TRUE(npy::writeArray(path, {"<f4", {2, 3}, bytesOf(values)}).isOk());
  std::vector<uint8_t> out;
  status = npy::readAs(path, DType::F32, {3, 2}, out);
  EXPECT_THAT(status.message(),
              HasSubstr("shape (2, 3) disagrees with the argument's (3, 2)"));
  status = npy::readAs(path, DType::I32, {2, 3}, out);
  EXPECT_THAT(status.message(), HasSubstr("cannot be read as a i32"));

  // Truncated data.
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  status = npy::readArray(path, array);
  EXPECT_THAT(status.message(), HasSubstr("truncated"));

  ASSERT_TRUE(npy::writeArray(path, {">f4", {6}, bytesOf(values)}).isOk());
  EXPECT_THAT(npy::readArray(path, array).message(), HasSubstr("big-endian"));
  ASSERT_TRUE(npy::writeArray(path, {"<c8", {3}, bytesOf(values)}).isOk());
  EXPECT_THAT(npy::readArray(path, array).message(),
              HasSubstr("'<c8' is not supported"));

  // Fortran order.
  std::string header =
      "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
  header.append(128 - 10 - header.size() - 1, ' ');
  header += '\n';
  std::ofstream fortran(path, std::ios::binary);
  fortran.write("\x93NUMPY\x01\x00", 8);
  char length[2] = {static_cast<char>(header.size()), 0};
  fortran.write(length, 2);
  fortran << header;
  fortran.write(reinterpret_cast<const char *>(values.data()), 24);
  fortran.close();
  EXPECT_THAT(npy::readArray(path, array).message(), HasSubstr("Fortran"));

  EXPECT_EQ(npy::readArray("/no/such/file.npy", array).code(),
            StatusCode::IOError);
}
