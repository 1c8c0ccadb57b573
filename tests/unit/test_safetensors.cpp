// safetensors reader/writer: round trips of every supported dtype, byte layout, and every kind of
// corrupt file rejected at open with an error naming the file and the tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "tests/common/test_util.h"
#include "trainer/core/dtype.h"
#include "trainer/core/error.h"

namespace hyd {
namespace {

namespace fs = std::filesystem;

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_all(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A file from a literal header and a data buffer of `data_bytes` zero bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::vector<char> bytes(8);
  const uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.resize(bytes.size() + data_bytes, 0);
  write_all(path, bytes);
}

// Opening `path` must throw a hyd::Error whose message holds every one of `needles`.
void expect_open_error(const std::string& path, const std::vector<std::string>& needles) {
  SCOPED_TRACE("opening " + path);
  test::expect_error([&] { SafetensorsFile f(path); }, needles);
}

TEST(Safetensors, RoundTripAllDtypes) {
  test::TempDir tmp("hyd_st_");
  const std::string path = tmp.file("rt.safetensors");
  const std::vector<float> f32 = test::randn(2 * 3 * 5);
  const std::vector<float> bf = test::randn(7);
  // F16 bit patterns with known values: 1, -2, 0.5, 65504 (max), 2^-24 (smallest subnormal), 2^-14
  // (smallest normal), 3 * 2^-24 (subnormal), -0, +inf.
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x0400, 0x0003, 0x8000, 0x7C00};
  const std::vector<float> f16_expect = {1.0f,
                                         -2.0f,
                                         0.5f,
                                         65504.0f,
                                         std::ldexp(1.0f, -24),
                                         std::ldexp(1.0f, -14),
                                         3.0f * std::ldexp(1.0f, -24),
                                         -0.0f,
                                         std::numeric_limits<float>::infinity()};
  const std::vector<double> f64 = {3.25};
  const std::vector<int32_t> i32 = {-7, 0, 2147483647};
  const std::vector<int64_t> i64 = {-(int64_t(1) << 40), 5};

  SafetensorsWriter w;
  w.add_f32("a.weight", {2, 3, 5}, f32);
  w.add_bf16("b.bf16", {7}, bf);
  w.add("c.f16", SafetensorsDType::F16, {3, 3}, f16.data(), f16.size() * 2);
  w.add("d.scalar", SafetensorsDType::F64, {}, f64.data(), 8);
  w.add_i32("e.i32", {3}, i32);
  w.add_i64("f.i64", {1, 2}, i64);
  w.add_f32("g.empty", {0, 4}, {});
  w.set_metadata("format", "pt");
  w.write(path);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  // Layout: data buffer 8-byte aligned, header padded with spaces only.
  const std::vector<char> bytes = read_all(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  const std::string header(bytes.data() + 8, n);
  EXPECT_EQ(header.front(), '{');
  const size_t close = header.find_last_of('}');
  for (size_t i = close + 1; i < header.size(); ++i) EXPECT_EQ(header[i], ' ');

  SafetensorsFile f(path);
  EXPECT_EQ(f.names(),
            (std::vector<std::string>{"a.weight", "b.bf16", "c.f16", "d.scalar", "e.i32", "f.i64", "g.empty"}));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.info("a.weight").dtype, SafetensorsDType::F32);
  EXPECT_EQ(f.info("a.weight").shape, (std::vector<int64_t>{2, 3, 5}));
  EXPECT_EQ(f.info("d.scalar").shape.size(), 0u);
  EXPECT_EQ(f.info("d.scalar").numel(), 1);
  EXPECT_EQ(f.info("e.i32").dtype, SafetensorsDType::I32);
  EXPECT_EQ(f.info("f.i64").dtype, SafetensorsDType::I64);
  EXPECT_EQ(f.info("g.empty").numel(), 0);

  EXPECT_EQ(f.read_f32("a.weight"), f32);
  const std::vector<float> bf_back = f.read_f32("b.bf16");
  EXPECT_EQ(bf_back, test::round_bf16(bf));
  const std::vector<float> f16_back = f.read_f32("c.f16");
  ASSERT_EQ(f16_back.size(), f16_expect.size());
  for (size_t i = 0; i < f16_expect.size(); ++i) {
    EXPECT_EQ(f16_back[i], f16_expect[i]) << "f16 element " << i;
    EXPECT_EQ(std::signbit(f16_back[i]), std::signbit(f16_expect[i])) << "f16 element " << i;
  }
  EXPECT_EQ(f.read_f32("d.scalar"), std::vector<float>{3.25f});
  EXPECT_EQ(f.read_i64("e.i32"), (std::vector<int64_t>{-7, 0, 2147483647}));
  EXPECT_EQ(f.read_i64("f.i64"), i64);
  EXPECT_TRUE(f.read_f32("g.empty").empty());

  // Reading integers as floats (and the reverse) is refused, naming the tensor.
  test::expect_error([&] { f.read_f32("e.i32"); }, {"e.i32"});
  EXPECT_THROW(f.read_i64("a.weight"), Error);
  test::expect_error([&] { f.info("nope"); }, {path, "nope"});  // a missing tensor
}

TEST(Safetensors, WriterRejectsBadInput) {
  SafetensorsWriter w;
  w.add_f32("x", {2}, {1.0f, 2.0f});
  EXPECT_THROW(w.add_f32("x", {2}, {1.0f, 2.0f}), Error);              // duplicate name
  EXPECT_THROW(w.add_f32("y", {3}, {1.0f, 2.0f}), Error);              // shape vs bytes
  EXPECT_THROW(w.add_f32("__metadata__", {1}, {1.0f}), Error);         // reserved name
  EXPECT_THROW(w.write("/nonexistent-dir-hyd/x.safetensors"), Error);  // unwritable path
}

TEST(Safetensors, CorruptFilesNameFileAndTensor) {
  test::TempDir tmp("hyd_st_");
  const std::string good = tmp.file("good.safetensors");
  SafetensorsWriter w;
  w.add_f32("first", {4}, {1, 2, 3, 4});
  w.add_f32("last.weight", {2, 3}, {1, 2, 3, 4, 5, 6});
  w.write(good);
  const std::vector<char> bytes = read_all(good);
  ASSERT_NO_THROW(SafetensorsFile{good});

  {  // Truncated: the last tensor's data runs past the end. Caught at open.
    const std::string p = tmp.file("truncated.safetensors");
    write_all(p, std::vector<char>(bytes.begin(), bytes.end() - 4));
    expect_open_error(p, {p, "last.weight", "truncated"});
  }
  {  // Shorter than the 8-byte length prefix.
    const std::string p = tmp.file("short.safetensors");
    write_all(p, std::vector<char>(bytes.begin(), bytes.begin() + 5));
    expect_open_error(p, {p, "too short"});
  }
  {  // Header length beyond the file size.
    const std::string p = tmp.file("hugeheader.safetensors");
    std::vector<char> b = bytes;
    const uint64_t n = uint64_t(1) << 40;
    std::memcpy(b.data(), &n, 8);
    write_all(p, b);
    expect_open_error(p, {p, "header length", "beyond the file size"});
  }
  {  // Malformed JSON.
    const std::string p = tmp.file("badjson.safetensors");
    write_raw(p, R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})", 4);  // missing '}'
    expect_open_error(p, {p, "malformed JSON"});
  }
  {  // Offsets not matching shape * dtype size.
    const std::string p = tmp.file("mismatch.safetensors");
    write_raw(p, R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8);
    expect_open_error(p, {p, "'w'", "needs 12"});
  }
  {  // Offsets past the buffer.
    const std::string p = tmp.file("outofrange.safetensors");
    write_raw(p, R"({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [8, 16]}})", 8);
    expect_open_error(p, {p, "'w'", "past the end"});
  }
  {  // Overlapping tensors.
    const std::string p = tmp.file("overlap.safetensors");
    write_raw(p,
              R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
              R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
              12);
    expect_open_error(p, {p, "'b'", "overlaps"});
  }
  {  // Unindexed hole in the buffer.
    const std::string p = tmp.file("hole.safetensors");
    write_raw(p,
              R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
              R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
              12);
    expect_open_error(p, {p, "'b'", "hole"});
  }
  {  // Trailing bytes no tensor describes.
    const std::string p = tmp.file("trailing.safetensors");
    write_raw(p, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 12);
    expect_open_error(p, {p, "8 bytes after the last tensor"});
  }
  {  // Unknown dtype.
    const std::string p = tmp.file("dtype.safetensors");
    write_raw(p, R"({"q": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 1]}})", 1);
    expect_open_error(p, {p, "'q'", "unknown dtype 'Q4_K'"});
  }
  {  // The same name twice (JSON parsers would silently keep one).
    const std::string p = tmp.file("dup.safetensors");
    write_raw(p,
              R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
              R"( "t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
              8);
    expect_open_error(p, {p, "'t'", "twice"});
  }
  {  // Structurally wrong entries.
    const std::string p = tmp.file("noshape.safetensors");
    write_raw(p, R"({"s": {"dtype": "F32", "data_offsets": [0, 4]}})", 4);
    expect_open_error(p, {p, "'s'", "shape"});
    write_raw(p, R"({"s": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4);
    expect_open_error(p, {p, "'s'", "non-negative"});
    write_raw(p, R"({"s": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4);
    expect_open_error(p, {p, "'s'", "data_offsets"});
    write_raw(p, R"([1, 2])", 0);
    expect_open_error(p, {p, "not an object"});
  }
  expect_open_error(tmp.file("absent.safetensors"), {tmp.file("absent.safetensors"), "no such file"});
}

TEST(Safetensors, ShardedIndex) {
  test::TempDir tmp("hyd_st_");
  SafetensorsWriter a, b;
  a.add_f32("x", {2}, {1, 2});
  a.add_f32("y", {1}, {3});
  b.add_bf16("z", {3}, {4, 5, 6});
  a.write(tmp.file("model-00001-of-00002.safetensors"));
  b.write(tmp.file("model-00002-of-00002.safetensors"));
  const std::string index = tmp.file("model.safetensors.index.json");
  auto write_index = [&](const std::string& text) { std::ofstream(index) << text; };
  write_index(R"({"metadata": {"total_size": 24}, "weight_map": {"x": "model-00001-of-00002.safetensors",
      "y": "model-00001-of-00002.safetensors", "z": "model-00002-of-00002.safetensors"}})");

  const SafetensorsIndex idx = read_safetensors_index(index);
  EXPECT_EQ(idx.weight_map.size(), 3u);
  EXPECT_EQ(idx.files().size(), 2u);

  SafetensorsCheckpoint ck;
  ck.open_dir(tmp.file(""));
  EXPECT_TRUE(ck.sharded());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_EQ(ck.read_f32("z"), (std::vector<float>{4, 5, 6}));
  EXPECT_EQ(ck.read_f32("x"), (std::vector<float>{1, 2}));
  EXPECT_NE(ck.file_of("z").find("model-00002-of-00002.safetensors"), std::string::npos);
  EXPECT_EQ(ck.source(), index);

  // The index names the wrong shard for a tensor.
  write_index(R"({"weight_map": {"x": "model-00002-of-00002.safetensors", "y": "model-00001-of-00002.safetensors",
      "z": "model-00002-of-00002.safetensors"}})");
  test::expect_error([&] { ck.open_dir(tmp.file("")); }, {"model-00002-of-00002.safetensors", "'x'"});
  // A shard that does not exist.
  write_index(R"({"weight_map": {"x": "model-00003-of-00002.safetensors"}})");
  test::expect_error([&] { ck.open_dir(tmp.file("")); }, {"model-00003-of-00002.safetensors", index});
  // Malformed index.
  write_index(R"({"weight_map": ["x"]})");
  test::expect_error([&] { read_safetensors_index(index); }, {"weight_map"});
  // Neither a single file nor an index.
  fs::remove(index);
  EXPECT_THROW(ck.open_dir(tmp.file("")), Error);
}

// Interoperability with the `safetensors` Python package, driven by tests/cli/test_safetensors_python.sh:
// it runs PythonInteropWrite, checks the file with Python, writes one with Python, then runs
// PythonInteropRead. Without HYD_ST_INTEROP_DIR both are skipped. Values here and in the script must agree.
const char* interop_dir() { return std::getenv("HYD_ST_INTEROP_DIR"); }

TEST(Safetensors, PythonInteropWrite) {
  if (!interop_dir()) GTEST_SKIP() << "run by tests/cli/test_safetensors_python.sh";
  SafetensorsWriter w;
  std::vector<float> f32(12);
  for (int i = 0; i < 12; ++i) f32[i] = 0.25f * static_cast<float>(i) - 1.0f;
  w.add_f32("f32", {3, 4}, f32);
  w.add_bf16("bf16", {5}, {1.0f, -2.5f, 0.15625f, 256.0f, -0.0078125f});  // exact in bf16
  const std::vector<uint16_t> f16 = {0x3C00, 0xC100, 0x7BFF};             // 1, -2.5, 65504
  w.add("f16", SafetensorsDType::F16, {3}, f16.data(), 6);
  w.add_i64("i64", {2, 2}, {-1, 0, int64_t(1) << 40, 7});
  w.add_i32("i32", {3}, {-5, 6, 2147483647});
  const std::vector<uint8_t> u8 = {0, 1, 254, 255};
  w.add("u8", SafetensorsDType::U8, {4}, u8.data(), 4);
  const double scalar = 2.5;
  w.add("scalar_f64", SafetensorsDType::F64, {}, &scalar, 8);
  w.add_f32("empty", {0, 3}, {});
  w.set_metadata("producer", "hydistill");
  w.write(std::string(interop_dir()) + "/from_cpp.safetensors");
}

TEST(Safetensors, PythonInteropRead) {
  if (!interop_dir()) GTEST_SKIP() << "run by tests/cli/test_safetensors_python.sh";
  SafetensorsFile f(std::string(interop_dir()) + "/from_python.safetensors");
  EXPECT_EQ(f.metadata().at("producer"), "numpy");
  ASSERT_EQ(f.names().size(), 6u);
  EXPECT_EQ(f.info("a").dtype, SafetensorsDType::F32);
  EXPECT_EQ(f.info("a").shape, (std::vector<int64_t>{2, 3}));
  std::vector<float> a(6);
  for (int i = 0; i < 6; ++i) a[i] = static_cast<float>(i) / 3.0f;
  EXPECT_EQ(f.read_f32("a"), a);
  EXPECT_EQ(f.info("h").dtype, SafetensorsDType::F16);
  EXPECT_EQ(f.read_f32("h"), (std::vector<float>{1.0f, -2.5f, 65504.0f, std::ldexp(1.0f, -24)}));
  EXPECT_EQ(f.info("d").dtype, SafetensorsDType::F64);
  EXPECT_EQ(f.read_f32("d"), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(f.info("i").dtype, SafetensorsDType::I32);
  EXPECT_EQ(f.read_i64("i"), (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(f.info("l").dtype, SafetensorsDType::I64);
  EXPECT_EQ(f.info("l").shape, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(f.read_i64("l"), (std::vector<int64_t>{int64_t(1) << 40}));
  EXPECT_EQ(f.info("b").dtype, SafetensorsDType::BOOL);
  EXPECT_EQ(f.read_i64("b"), (std::vector<int64_t>{1, 0, 1}));
}

}  // namespace
}  // namespace hyd
