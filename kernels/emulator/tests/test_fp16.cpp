/*
 * float/double -> half/bfloat16 conversions round to nearest even, bit for bit, against an
 * independent reference: the nearest entry of a sorted table of every representable value (the
 * tie broken towards the even bit pattern; overflow is "the next value after the largest finite
 * one", i.e. infinity). Inputs: every tie point between adjacent representable values and its
 * neighbours, the exact values themselves, specials (zeros, subnormals, inf, NaN payloads) and a
 * few million pseudo-random floats. Also half/bf16 -> float exactly, over all 65536 patterns.
 */
#include "emulator/simt.h"

#include <vector>

#include "test_util.h"

namespace {

uint32_t f2u(float f) { return dk_emu::bit_cast<uint32_t>(f); }
float u2f(uint32_t u) { return dk_emu::bit_cast<float>(u); }

/* Value of a non-negative finite pattern of a binary format with `mbits` mantissa bits and
 * exponent bias `bias` (subnormals included), computed with ldexp. */
double small_float_value(unsigned bits, int mbits, int bias) {
    const unsigned e = bits >> mbits, m = bits & ((1u << mbits) - 1u);
    if (e == 0) return std::ldexp(static_cast<double>(m), 1 - bias - mbits);
    return std::ldexp(static_cast<double>(m + (1u << mbits)), static_cast<int>(e) - bias - mbits);
}

struct Table {
    std::vector<double> value; /* ascending: all finite non-negative values, then "infinity" */
    std::vector<unsigned> bits;
};

Table make_table(int mbits, int bias, unsigned inf_bits) {
    Table t;
    for (unsigned b = 0; b < inf_bits; ++b) {
        t.value.push_back(small_float_value(b, mbits, bias));
        t.bits.push_back(b);
    }
    /* Infinity takes the place of the next binade's first value, an even pattern. */
    t.value.push_back(small_float_value(inf_bits, mbits, bias));
    t.bits.push_back(inf_bits);
    return t;
}

/* Reference rounding of a double (exactly representing the input) to the table's format. */
unsigned ref_round(const Table& t, double x, unsigned inf_bits) {
    if (std::isnan(x)) return 0x7fffu;
    const unsigned sign = std::signbit(x) ? 0x8000u : 0u;
    const double a = std::fabs(x);
    if (a >= t.value.back()) return sign | inf_bits;
    /* first entry > a */
    size_t hi = std::upper_bound(t.value.begin(), t.value.end(), a) - t.value.begin();
    const size_t lo = hi - 1;
    if (t.value[lo] == a) return sign | t.bits[lo];
    const double mid = (t.value[lo] + t.value[hi]) / 2; /* exact: one more bit than the format */
    size_t pick;
    if (a < mid)
        pick = lo;
    else if (a > mid)
        pick = hi;
    else
        pick = (t.bits[lo] & 1u) ? hi : lo;
    return sign | t.bits[pick];
}

uint32_t xorshift(uint32_t& s) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    return s;
}

template <class Conv>
void check_float_inputs(const char* name, const Table& t, unsigned inf_bits, const std::vector<float>& inputs, Conv conv) {
    int shown = 0;
    long bad = 0;
    for (float f : inputs) {
        const unsigned got = conv(f);
        const unsigned want = ref_round(t, static_cast<double>(f), inf_bits);
        bool ok = got == want;
        if (std::isnan(f)) ok = got == 0x7fffu; /* canonical NaN, like the hardware's cvt.rn */
        if (!ok) {
            ++bad;
            if (shown++ < 10)
                std::fprintf(stderr, "%s(%a = 0x%08x) = 0x%04x, want 0x%04x\n", name, static_cast<double>(f), f2u(f), got, want);
        }
    }
    ++g_checks;
    if (bad) {
        ++g_failures;
        std::fprintf(stderr, "%s: %ld of %zu inputs wrong\n", name, bad, inputs.size());
    } else {
        std::printf("  %s: %zu inputs bit-exact\n", name, inputs.size());
    }
}

/* Inputs around every value of a 16-bit format embedded in float: the value, the tie with the
 * next value, and one float ulp either side of both. */
void add_ties(std::vector<float>& in, const Table& t) {
    for (size_t i = 0; i + 1 < t.value.size(); ++i) {
        const float v = static_cast<float>(t.value[i]);
        const float mid = static_cast<float>((t.value[i] + t.value[i + 1]) / 2);
        if (static_cast<double>(mid) != (t.value[i] + t.value[i + 1]) / 2) continue; /* not a float */
        for (float x : {v, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY), std::nextafter(v, INFINITY)}) {
            in.push_back(x);
            in.push_back(-x);
        }
    }
}

void add_specials(std::vector<float>& in) {
    const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x00000001u, 0x80000001u, 0x007fffffu, 0x00800000u,
                                 0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u,
                                 0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x7fffffffu, 0x7fc12345u, 0x33000000u,
                                 0x33000001u, 0x32ffffffu, 0x33800000u, 0x38800000u, 0x387fffffu, 0x477fe000u,
                                 0x477fefffu, 0x477ff000u, 0x477ff001u, 0x47800000u, 0x7f7f8000u, 0x7f7f7fffu};
    for (uint32_t u : specials) in.push_back(u2f(u));
    for (float f : {65504.0f, 65519.99f, 65520.0f, 65536.0f, 1e-8f, 5.96e-8f, 2.98e-8f, 6.1e-5f, 3.4e38f})
        for (float s : {1.0f, -1.0f}) in.push_back(f * s);
}

void test_half() {
    const Table t = make_table(10, 15, 0x7c00);
    std::vector<float> in;
    add_ties(in, t);
    add_specials(in);
    uint32_t s = 0x12345678u;
    for (int i = 0; i < 3000000; ++i) in.push_back(u2f(xorshift(s)));
    /* dense sweep of the subnormal and overflow boundaries */
    for (uint32_t u = 0x33000000u - 4096; u < 0x33000000u + 4096; ++u) in.push_back(u2f(u));
    for (uint32_t u = 0x387f0000u; u < 0x38810000u; u += 3) in.push_back(u2f(u));
    for (uint32_t u = 0x477fe000u; u < 0x47801000u; ++u) in.push_back(u2f(u));

    check_float_inputs("__float2half_rn", t, 0x7c00, in, [](float f) { return static_cast<unsigned>(__half_as_ushort(__float2half_rn(f))); });
    check_float_inputs("__float2half", t, 0x7c00, in, [](float f) { return static_cast<unsigned>(__half_as_ushort(__float2half(f))); });
    check_float_inputs("__half(float)", t, 0x7c00, in, [](float f) { return static_cast<unsigned>(__half(f).__x); });

    /* half -> float is exact; all patterns. */
    long bad = 0;
    for (unsigned b = 0; b < 65536; ++b) {
        const float got = __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
        const unsigned mag = b & 0x7fffu;
        if (mag > 0x7c00u) {
            if (!std::isnan(got)) ++bad;
            continue;
        }
        double want = mag == 0x7c00u ? INFINITY : small_float_value(mag, 10, 15);
        if (b & 0x8000u) want = -want;
        if (static_cast<double>(got) != want || std::signbit(got) != std::signbit(want)) ++bad;
        /* round trip */
        if (__half_as_ushort(__float2half_rn(got)) != b) ++bad;
    }
    CHECK_MSG(bad == 0, "__half2float: %ld of 65536 patterns wrong", bad);

    /* double -> half: ties and neighbours in double precision. */
    bad = 0;
    for (size_t i = 0; i + 1 < t.value.size(); ++i) {
        const double mid = (t.value[i] + t.value[i + 1]) / 2;
        for (double x : {t.value[i], mid, std::nextafter(mid, 0.0), std::nextafter(mid, INFINITY)}) {
            for (double sx : {x, -x}) {
                const unsigned got = __half_as_ushort(__double2half(sx));
                if (got != ref_round(t, sx, 0x7c00)) ++bad;
            }
        }
    }
    CHECK_MSG(bad == 0, "__double2half: %ld wrong", bad);
    CHECK(__half_as_ushort(__double2half(NAN)) == 0x7fffu);
    CHECK(__half_as_ushort(__double2half(-INFINITY)) == 0xfc00u);
    CHECK(__half_as_ushort(__double2half(1e300)) == 0x7c00u);
    CHECK(__half_as_ushort(__double2half(-1e-300)) == 0x8000u);
}

void test_bf16() {
    const Table t = make_table(7, 127, 0x7f80);
    std::vector<float> in;
    add_ties(in, t);
    add_specials(in);
    uint32_t s = 0x9e3779b9u;
    for (int i = 0; i < 3000000; ++i) in.push_back(u2f(xorshift(s)));
    for (uint32_t u = 0; u < 0x20000u; ++u) in.push_back(u2f(u)); /* float subnormals */
    for (uint32_t u = 0x7f7e0000u; u < 0x7f800000u; u += 7) in.push_back(u2f(u));

    check_float_inputs("__float2bfloat16_rn", t, 0x7f80, in,
                       [](float f) { return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(f))); });
    check_float_inputs("__float2bfloat16", t, 0x7f80, in,
                       [](float f) { return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16(f))); });
    check_float_inputs("__nv_bfloat16(float)", t, 0x7f80, in, [](float f) { return static_cast<unsigned>(__nv_bfloat16(f).__x); });

    long bad = 0;
    for (unsigned b = 0; b < 65536; ++b) {
        const float got = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
        const unsigned mag = b & 0x7fffu;
        if (mag > 0x7f80u) {
            if (!std::isnan(got)) ++bad;
            continue;
        }
        double want = mag == 0x7f80u ? INFINITY : small_float_value(mag, 7, 127);
        if (b & 0x8000u) want = -want;
        if (static_cast<double>(got) != want || std::signbit(got) != std::signbit(want)) ++bad;
        if (__bfloat16_as_ushort(__float2bfloat16_rn(got)) != b) ++bad;
    }
    CHECK_MSG(bad == 0, "__bfloat162float: %ld of 65536 patterns wrong", bad);

    bad = 0;
    for (size_t i = 0; i + 1 < t.value.size(); i += 3) {
        const double mid = (t.value[i] + t.value[i + 1]) / 2;
        for (double x : {t.value[i], mid, std::nextafter(mid, 0.0), std::nextafter(mid, INFINITY)}) {
            for (double sx : {x, -x}) {
                if (__bfloat16_as_ushort(__double2bfloat16(sx)) != ref_round(t, sx, 0x7f80)) ++bad;
            }
        }
    }
    CHECK_MSG(bad == 0, "__double2bfloat16: %ld wrong", bad);
}

void test_misc() {
    /* The types behave like CUDA's host-side types. */
    __half h = 1.5f;
    const float f = h;
    CHECK(f == 1.5f);
    __nv_bfloat16 b(2.0);
    CHECK(static_cast<float>(b) == 2.0f);
    __half2 h2 = __floats2half2_rn(1.0f, -2.0f);
    CHECK(__low2float(h2) == 1.0f && __high2float(h2) == -2.0f);
    CHECK(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2 && alignof(__half2) == 4);
    CHECK(alignof(float4) == 16 && alignof(int4) == 16 && alignof(uint4) == 16 && alignof(uint2) == 8 && alignof(float2) == 8);
    CHECK(__hisnan(__ushort_as_half(0x7e00)) && !__hisnan(__ushort_as_half(0x7c00)));
    /* other intrinsics */
    CHECK(__saturatef(-1.0f) == 0.0f && __saturatef(2.0f) == 1.0f && __saturatef(NAN) == 0.0f && __saturatef(0.25f) == 0.25f);
    CHECK(__float_as_uint(1.0f) == 0x3f800000u && __uint_as_float(0x40000000u) == 2.0f);
    CHECK(__int_as_float(__float_as_int(-3.5f)) == -3.5f);
    CHECK(__float2int_rn(2.5f) == 2 && __float2int_rn(3.5f) == 4 && __float2int_rn(NAN) == 0 && __float2int_rn(1e20f) == INT_MAX);
    CHECK(__float2int_rz(-2.7f) == -2 && __float2int_rd(-2.2f) == -3 && __float2int_ru(2.2f) == 3);
    CHECK(__popc(0xf0f0u) == 8 && __clz(1) == 31 && __clz(0) == 32 && __ffs(8) == 4 && __brev(1u) == 0x80000000u);
    CHECK(__umulhi(0x80000000u, 4u) == 2u && __funnelshift_l(0u, 1u, 4) == 16u);
    CHECK(max(3, 5) == 5 && min(3u, 5u) == 3u && max(2.0f, -1.0f) == 2.0f && min(1.0, 2.0) == 1.0 && max(7ll, 9ll) == 9ll);
    CHECK(__fdividef(1.0f, 4.0f) == 0.25f && __frcp_rn(4.0f) == 0.25f && rsqrtf(4.0f) == 0.5f);
    CHECK(__fmul_rn(3.0f, 0.5f) == 1.5f && __fadd_rn(1.0f, 2.0f) == 3.0f);
    CHECK(std::fabs(__expf(1.0f) - 2.7182817f) < 1e-6f && std::fabs(__logf(2.0f) - 0.6931472f) < 1e-6f);
    CHECK(__exp2f(3.0f) == 8.0f && __log2f(8.0f) == 3.0f && exp2f(2.0f) == 4.0f);
    CHECK(isinf(INFINITY) && isnan(NAN) && !isnan(FLT_MAX) && fmaxf(1.0f, NAN) == 1.0f);
    const float x = 1.0f;
    CHECK(__ldg(&x) == 1.0f);
}

}  // namespace

int main() {
    std::printf("half / bfloat16 conversions:\n");
    test_half();
    test_bf16();
    test_misc();
    return finish("test_fp16");
}
