#include "textflag.h"

// AES-XTS over whole sectors with AES-NI, eight blocks in flight so the AES
// units stay busy (one block at a time waits on each round's latency).
// Each sector's tweak is E_k2(iv) with iv advancing by step per sector; the
// tweak is doubled in GF(2^128) per block in registers. Sector sizes are
// multiples of 128 bytes and n is a multiple of the sector size (checked by
// the Go caller). dst and src may be the same buffer: each group of eight
// blocks is read whole before it is written.

// The XTS doubling constant: 0x87 into the low dword when the top bit of the
// 128-bit tweak falls off, 1 into bit 64 when the low qword's top bit
// carries over (PADDQ doubles the two halves separately).
DATA xtsMask<>+0(SB)/8, $0x87
DATA xtsMask<>+8(SB)/8, $1
GLOBL xtsMask<>(SB), (NOPTR+RODATA), $16

// MULX doubles the tweak in X8 (X9 scratch, X11 the mask).
#define MULX \
	PSHUFD $0x13, X8, X9; \
	PADDQ  X8, X8; \
	PSRAL  $31, X9; \
	PAND   X11, X9; \
	PXOR   X9, X8

// TWEAKS stores the next eight tweaks at 0..112(SP) and leaves X8 at the
// ninth.
#define TWEAKS \
	MOVOU X8, 0(SP); MULX; \
	MOVOU X8, 16(SP); MULX; \
	MOVOU X8, 32(SP); MULX; \
	MOVOU X8, 48(SP); MULX; \
	MOVOU X8, 64(SP); MULX; \
	MOVOU X8, 80(SP); MULX; \
	MOVOU X8, 96(SP); MULX; \
	MOVOU X8, 112(SP); MULX

// LOADX loads block i of SI into X, XORed with its tweak and round key 0 (X10).
#define LOADX(i, X) \
	MOVOU (i*16)(SI), X; \
	MOVOU (i*16)(SP), X12; \
	PXOR  X12, X; \
	PXOR  X10, X

// STOREX XORs block i's tweak into X and stores it to DI.
#define STOREX(i, X) \
	MOVOU (i*16)(SP), X12; \
	PXOR  X12, X; \
	MOVOU X, (i*16)(DI)

#define ROUND8(OP) \
	OP X10, X0; OP X10, X1; OP X10, X2; OP X10, X3; \
	OP X10, X4; OP X10, X5; OP X10, X6; OP X10, X7

// SECTORTWEAK sets X8 to E_k2(R11) with the key schedule at DX (R13 rounds).
#define SECTORTWEAK \
	MOVQ   R11, X8; \
	MOVOU  (DX), X10; \
	PXOR   X10, X8; \
	LEAQ   16(DX), BX; \
	MOVQ   R13, CX; \
	DECQ   CX

#define ARGS \
	MOVQ  k1+0(FP), AX; \
	MOVQ  k2+8(FP), DX; \
	MOVQ  nr+16(FP), R13; \
	MOVQ  dst+24(FP), DI; \
	MOVQ  src+32(FP), SI; \
	MOVQ  n+40(FP), R8; \
	MOVQ  sector+48(FP), R9; \
	MOVQ  iv+56(FP), R11; \
	MOVQ  step+64(FP), R12; \
	MOVOU xtsMask<>(SB), X11

#define LOAD8 \
	MOVOU (AX), X10; \
	LOADX(0, X0); LOADX(1, X1); LOADX(2, X2); LOADX(3, X3); \
	LOADX(4, X4); LOADX(5, X5); LOADX(6, X6); LOADX(7, X7); \
	LEAQ  16(AX), BX; \
	MOVQ  R13, CX; \
	DECQ  CX

#define STORE8 \
	STOREX(0, X0); STOREX(1, X1); STOREX(2, X2); STOREX(3, X3); \
	STOREX(4, X4); STOREX(5, X5); STOREX(6, X6); STOREX(7, X7); \
	ADDQ $128, SI; \
	ADDQ $128, DI

// func xtsEncryptSectors(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)
TEXT ·xtsEncryptSectors(SB), NOSPLIT, $128-72
	ARGS
	TESTQ R8, R8
	JZ    done

sector:
	SECTORTWEAK

tround:
	MOVOU  (BX), X10
	AESENC X10, X8
	ADDQ   $16, BX
	DECQ   CX
	JNZ    tround
	MOVOU      (BX), X10
	AESENCLAST X10, X8
	MOVQ       R9, R10

blocks:
	TWEAKS
	LOAD8

round:
	MOVOU (BX), X10
	ROUND8(AESENC)
	ADDQ  $16, BX
	DECQ  CX
	JNZ   round
	MOVOU (BX), X10
	ROUND8(AESENCLAST)
	STORE8
	SUBQ  $128, R10
	JNZ   blocks

	ADDQ R12, R11
	SUBQ R9, R8
	JNZ  sector

done:
	RET

// func xtsDecryptSectors(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)
// k1 is the decryption schedule (the equivalent inverse cipher's), k2 the
// tweak key's encryption schedule.
TEXT ·xtsDecryptSectors(SB), NOSPLIT, $128-72
	ARGS
	TESTQ R8, R8
	JZ    done

sector:
	SECTORTWEAK

tround:
	MOVOU  (BX), X10
	AESENC X10, X8
	ADDQ   $16, BX
	DECQ   CX
	JNZ    tround
	MOVOU      (BX), X10
	AESENCLAST X10, X8
	MOVQ       R9, R10

blocks:
	TWEAKS
	LOAD8

round:
	MOVOU (BX), X10
	ROUND8(AESDEC)
	ADDQ  $16, BX
	DECQ  CX
	JNZ   round
	MOVOU (BX), X10
	ROUND8(AESDECLAST)
	STORE8
	SUBQ  $128, R10
	JNZ   blocks

	ADDQ R12, R11
	SUBQ R9, R8
	JNZ  sector

done:
	RET

// func aesInvMixColumns(dst, src *byte)
TEXT ·aesInvMixColumns(SB), NOSPLIT, $0-16
	MOVQ   src+8(FP), SI
	MOVQ   dst+0(FP), DI
	MOVOU  (SI), X0
	AESIMC X0, X0
	MOVOU  X0, (DI)
	RET
