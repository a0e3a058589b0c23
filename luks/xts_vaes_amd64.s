#include "textflag.h"

// AES-XTS with VAES: the same as xts_amd64.s with 256-bit registers, two
// blocks per register and sixteen blocks in flight (VAES doubles the AES
// units' work per instruction). The sixteen tweaks live in the frame; after
// each group every one advances by x^16 at once (a two-byte shift per lane
// and the two bytes that fall off folded back through a carry-less multiply
// by 0x87), instead of sixteen dependent doublings. Sector sizes are
// multiples of 256 bytes (checked by the Go caller). VEX encodings only, so
// no SSE/AVX transition stalls; VZEROUPPER before returning.

// The doubling mask, as in xts_amd64.s.
DATA xtsMaskV<>+0(SB)/8, $0x87
DATA xtsMaskV<>+8(SB)/8, $1
GLOBL xtsMaskV<>(SB), (NOPTR+RODATA), $16

DATA xtsPoly<>+0(SB)/8, $0x87
DATA xtsPoly<>+8(SB)/8, $0
GLOBL xtsPoly<>(SB), (NOPTR+RODATA), $16

#define VARGS \
	MOVQ    k1+0(FP), AX; \
	MOVQ    k2+8(FP), DX; \
	MOVQ    nr+16(FP), R13; \
	MOVQ    dst+24(FP), DI; \
	MOVQ    src+32(FP), SI; \
	MOVQ    n+40(FP), R8; \
	MOVQ    sector+48(FP), R9; \
	MOVQ    iv+56(FP), R11; \
	MOVQ    step+64(FP), R12; \
	VMOVDQU xtsMaskV<>(SB), X11

// VMULX doubles the tweak in X8 (X9 scratch, X11 the mask).
#define VMULX \
	VPSHUFD $0x13, X8, X9; \
	VPADDQ  X8, X8, X8; \
	VPSRAD  $31, X9, X9; \
	VPAND   X11, X9, X9; \
	VPXOR   X9, X8, X8

// VMULXK stores the two tweaks in Y13 times x^k (k < 57) at off(SP): each
// lane shifted left by k bits, the low qword's carry moved into the high
// one, the bits that fall off the top folded back as their product with
// 0x87. The seven multiples of a sector are independent of each other,
// where doubling sixteen times is one chain.
#define VMULXK(k, off) \
	VPSRLQ     $(64-k), Y13, Y8; \
	VPSLLDQ    $8, Y8, Y9; \
	VPSRLDQ    $8, Y8, Y8; \
	VPCLMULQDQ $0x00, Y14, Y8, Y8; \
	VPSLLQ     $k, Y13, Y10; \
	VPXOR      Y9, Y10, Y10; \
	VPXOR      Y8, Y10, Y10; \
	VMOVDQU    Y10, off(SP)

// VSECTOR sets the sector's first tweak, E_k2(R11), and the next fifteen at
// 0..240(SP): the first two in Y13, the rest as their multiples.
#define VSECTOR \
	VMOVQ   R11, X8; \
	VMOVDQU (DX), X10; \
	VPXOR   X10, X8, X8; \
	LEAQ    16(DX), BX; \
	MOVQ    R13, CX; \
	DECQ    CX; \
vtround: \
	VMOVDQU (BX), X10; \
	VAESENC X10, X8, X8; \
	ADDQ    $16, BX; \
	DECQ    CX; \
	JNZ     vtround; \
	VMOVDQU     (BX), X10; \
	VAESENCLAST X10, X8, X8; \
	VMOVDQA     X8, X13; \
	VMULX; \
	VINSERTI128 $1, X8, Y13, Y13; \
	VMOVDQU     Y13, 0(SP); \
	VMULXK(2, 32); VMULXK(4, 64); VMULXK(6, 96); VMULXK(8, 128); \
	VMULXK(10, 160); VMULXK(12, 192); VMULXK(14, 224)

// VLOAD loads blocks 2i and 2i+1 of SI into Y, XORed with their tweaks and
// round key 0 (Y15).
#define VLOAD(i, Y) \
	VMOVDQU (i*32)(SI), Y; \
	VPXOR   (i*32)(SP), Y, Y; \
	VPXOR   Y15, Y, Y

#define VSTORE(i, Y) \
	VPXOR   (i*32)(SP), Y, Y; \
	VMOVDQU Y, (i*32)(DI)

// VNEXT advances the two tweaks at i*32(SP) by x^16 (Y14 holds 0x87 in each
// lane's low qword).
#define VNEXT(i) \
	VMOVDQU    (i*32)(SP), Y8; \
	VPSRLDQ    $14, Y8, Y9; \
	VPCLMULQDQ $0x00, Y14, Y9, Y9; \
	VPSLLDQ    $2, Y8, Y8; \
	VPXOR      Y9, Y8, Y8; \
	VMOVDQU    Y8, (i*32)(SP)

#define VROUND(OP) \
	VBROADCASTI128 (BX), Y15; \
	OP Y15, Y0, Y0; OP Y15, Y1, Y1; OP Y15, Y2, Y2; OP Y15, Y3, Y3; \
	OP Y15, Y4, Y4; OP Y15, Y5, Y5; OP Y15, Y6, Y6; OP Y15, Y7, Y7

// VSECTORS is the whole loop with OP the round and LAST the last round.
#define VSECTORS(OP, LAST) \
	VARGS; \
	VBROADCASTI128 xtsPoly<>(SB), Y14; \
	TESTQ R8, R8; \
	JZ    vdone; \
vsector: \
	VSECTOR; \
	MOVQ R9, R10; \
vblocks: \
	VBROADCASTI128 (AX), Y15; \
	VLOAD(0, Y0); VLOAD(1, Y1); VLOAD(2, Y2); VLOAD(3, Y3); \
	VLOAD(4, Y4); VLOAD(5, Y5); VLOAD(6, Y6); VLOAD(7, Y7); \
	LEAQ 16(AX), BX; \
	MOVQ R13, CX; \
	DECQ CX; \
vround: \
	VROUND(OP); \
	ADDQ $16, BX; \
	DECQ CX; \
	JNZ  vround; \
	VROUND(LAST); \
	VSTORE(0, Y0); VSTORE(1, Y1); VSTORE(2, Y2); VSTORE(3, Y3); \
	VSTORE(4, Y4); VSTORE(5, Y5); VSTORE(6, Y6); VSTORE(7, Y7); \
	ADDQ $256, SI; \
	ADDQ $256, DI; \
	SUBQ $256, R10; \
	JZ   vnext; \
	VNEXT(0); VNEXT(1); VNEXT(2); VNEXT(3); \
	VNEXT(4); VNEXT(5); VNEXT(6); VNEXT(7); \
	JMP  vblocks; \
vnext: \
	ADDQ R12, R11; \
	SUBQ R9, R8; \
	JNZ  vsector; \
vdone: \
	VZEROUPPER; \
	RET

// func xtsEncryptSectorsVAES(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)
TEXT ·xtsEncryptSectorsVAES(SB), NOSPLIT, $256-72
	VSECTORS(VAESENC, VAESENCLAST)

// func xtsDecryptSectorsVAES(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)
// k1 is the decryption schedule, as for xtsDecryptSectors.
TEXT ·xtsDecryptSectorsVAES(SB), NOSPLIT, $256-72
	VSECTORS(VAESDEC, VAESDECLAST)

// func cpuid7ecx() uint32 returns CPUID leaf 7's ECX (VAES is bit 9,
// VPCLMULQDQ bit 10); the caller checks AVX2 first, which implies leaf 7.
TEXT ·cpuid7ecx(SB), NOSPLIT, $0-4
	MOVL  $7, AX
	XORL  CX, CX
	CPUID
	MOVL  CX, ret+0(FP)
	RET
