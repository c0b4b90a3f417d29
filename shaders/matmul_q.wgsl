// Tiled matrix product for prefill, MLX-affine quantized weights dequantized in registers:
// each invocation dequantizes CT weight rows one vec4 at a time and uses each for RT rows of x.
override WGX: u32 = 8u;
override WGY: u32 = 8u;
override BITS: u32 = 4u;
override GS: u32 = 64u;
const RT: u32 = $RT;
const CT: u32 = $CT;

struct P { rows: u32, nin: u32, nout: u32, ystride: u32, yoff: u32, has_bias: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> sb: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WGX, WGY)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let c0 = (wid.x * WGX + lid.x) * CT;
    let r0 = (wid.y * WGY + lid.y) * RT;
    if (c0 >= p.nout || r0 >= p.rows) { return; }
    let per = 32u / BITS;
    let nv = per / 4u;
    let wpg = GS / per;
    let groups = p.nin / GS;
    let in4 = p.nin / 4u;
    let mask = vec4<u32>((1u << BITS) - 1u);
    var acc: array<array<f32, CT>, RT>;
    var wr: array<u32, CT>;
    for (var c = 0u; c < CT; c++) { wr[c] = min(c0 + c, p.nout - 1u); }
    var xb: array<u32, RT>;
    for (var t = 0u; t < RT; t++) { xb[t] = min(r0 + t, p.rows - 1u) * in4; }
    for (var g = 0u; g < groups; g++) {
        var s: array<vec2<f32>, CT>;
        for (var c = 0u; c < CT; c++) { s[c] = sb[wr[c] * groups + g]; }
        for (var j = 0u; j < wpg; j++) {
            var words: array<u32, CT>;
            for (var c = 0u; c < CT; c++) { words[c] = w[(wr[c] * groups + g) * wpg + j]; }
            for (var v = 0u; v < nv; v++) {
                let sh = (vec4<u32>(0u, 1u, 2u, 3u) + v * 4u) * BITS;
                var wv: array<vec4<f32>, CT>;
                for (var c = 0u; c < CT; c++) {
                    wv[c] = vec4<f32>((vec4<u32>(words[c]) >> sh) & mask) * s[c].x + s[c].y;
                }
                let xi = (g * GS + j * per + v * 4u) / 4u;
                for (var t = 0u; t < RT; t++) {
                    let xv = x[xb[t] + xi];
                    for (var c = 0u; c < CT; c++) { acc[t][c] += dot(xv, wv[c]); }
                }
            }
        }
    }
    for (var c = 0u; c < CT; c++) {
        if (c0 + c >= p.nout) { break; }
        var b = 0.0;
        if (p.has_bias != 0u) { b = bias[c0 + c]; }
        for (var t = 0u; t < RT; t++) {
            if (r0 + t < p.rows) { y[(r0 + t) * p.ystride + p.yoff + c0 + c] = acc[t][c] + b; }
        }
    }
}
